"""Credentials taken out of any text that may reach a user, a log or a stored record.

Each pattern is a shape a secret comes in: a `key=value` pair (also `key: value`, JSON's
`"key": "value"`, a quoted value with spaces, and an HTTP `Authorization: Basic ...` header), an
HTTP bearer token, the password inside a URL (`redis://:pw@host`, `https://user:pw@host`, an `@`
in the password included), and the recognisable key formats (Hugging Face `hf_...`, OpenAI-style
`sk-...`, AWS access key ids, GitHub `ghp_...`, Slack `xoxb-...`). What is left names where the
secret was, never the secret.
"""

from __future__ import annotations

import re

HIDDEN = "***"

_PAIR = re.compile(
    r"(?i)(secret[_-]?key|access[_-]?key|api[_-]?key|client[_-]?secret|secret|password|passwd"
    r"|token|authorization)"
    r"([\"']?\s*[=:]\s*)"
    # An authorization scheme stays readable; the credential after it does not.
    r"((?:basic|bearer|digest)\s+)?"
    r"(\"[^\"]*\"|'[^']*'|[\"']?[^\s\"',&]+)"
)
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+")
# Greedy up to the last '@' before the path: a password may hold an '@' of its own.
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*):[^/\s]+@")
_KEYS = re.compile(
    r"\b(?:hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{16,}|(?:AKIA|ASIA)[0-9A-Z]{16}"
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}|xox[abeoprs]-[A-Za-z0-9-]{10,})\b"
)


def _hide_value(match: re.Match[str]) -> str:
    """The pair with its value hidden, keeping the value's quotes and any scheme before it."""
    key, separator, scheme, value = match.groups()
    quote = value[0] if value[0] in "\"'" else ""
    return f"{key}{separator}{scheme or ''}{quote}{HIDDEN}{quote}"


def redact(text: str) -> str:
    """`text` with every credential it holds replaced by ***."""
    text = _BEARER.sub(rf"\1 {HIDDEN}", text)
    text = _URL_PASSWORD.sub(rf"\1:{HIDDEN}@", text)
    text = _KEYS.sub(HIDDEN, text)
    return _PAIR.sub(_hide_value, text)
