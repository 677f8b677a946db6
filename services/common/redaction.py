"""Credentials taken out of any text that may reach a user, a log or a stored record.

Each pattern is a shape a secret comes in: a `key=value` pair (also `key: value` and JSON's
`"key": "value"`), an HTTP bearer token, the password inside a URL (`redis://:pw@host`,
`https://user:pw@host`), and the recognisable key formats (Hugging Face `hf_...`, OpenAI-style
`sk-...`, AWS access key ids). What is left names where the secret was, never the secret.
"""

from __future__ import annotations

import re

HIDDEN = "***"

_PAIR = re.compile(
    r"(?i)(secret[_-]?key|access[_-]?key|api[_-]?key|client[_-]?secret|password|passwd|token"
    r"|authorization)([\"']?\s*[=:]\s*[\"']?)(?!bearer\s)([^\s\"',&]+)"
)
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+")
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*):[^/\s@]+@")
_KEYS = re.compile(r"\b(?:hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{16,}|(?:AKIA|ASIA)[0-9A-Z]{16})\b")


def redact(text: str) -> str:
    """`text` with every credential it holds replaced by ***."""
    text = _BEARER.sub(rf"\1 {HIDDEN}", text)
    text = _URL_PASSWORD.sub(rf"\1:{HIDDEN}@", text)
    text = _KEYS.sub(HIDDEN, text)
    return _PAIR.sub(lambda m: f"{m.group(1)}{m.group(2)}{HIDDEN}", text)
