"""Register an exported GGUF with an Ollama daemon, through its documented HTTP API.

The way Ollama's docs/api.md gives for a GGUF: push the file as a blob named by its sha256
(`HEAD /api/blobs/sha256:<digest>` says whether the daemon has it already, `POST` uploads it), then
`POST /api/create` naming that blob under the file's name, with the chat template, stop tokens and
context length that modelfile.py works out. Only HTTP crosses over, so a daemon in a container or
on another machine works as well as a local one.

A daemon that is starting, restarting or briefly failing (connection refused, 5xx) is retried with
backoff; one that stays away, or answers that it will not create the model, is an
OllamaRegistrationError that says which and how to fix it.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from backpropagate_api.errors import ConfigError, OllamaRegistrationError
from backpropagate_api.uploads import sha256_file
from backpropagate_services.export.modelfile import detect_template_family, ollama_parameters

_DEFAULT_PORT = "11434"  # on 127.0.0.1 when OLLAMA_HOST is unset
_CONNECT_TIMEOUT_S = 5.0
_LOOKUP_TIMEOUT_S = 30.0
# The daemon hashes an upload before answering and parses the GGUF on create: minutes, for a
# large file on a slow disk.
_TRANSFER_TIMEOUT_S = 900.0
_REFUSED_HINT = (
    "Ollama is running but would not create the model; its message says why. Update Ollama if "
    "it is too old to know `files` in /api/create; for a 5xx, see the daemon's log."
)
_SILENT_HINT = (
    "Ollama took the request but did not answer in time: see its log (the terminal running "
    "`ollama serve`, or `journalctl -u ollama`), then retry."
)


@dataclass(frozen=True)
class RetryPolicy:
    """How long to ride out a daemon that is starting or restarting before giving up."""

    attempts: int = 5
    first_wait_s: float = 0.5  # then doubling, up to max_wait_s
    max_wait_s: float = 8.0


DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True)
class OllamaModel:
    """A model the daemon now serves: `ollama run <name>`."""

    name: str
    digest: str  # sha256 of the GGUF, hex: the blob Ollama stores it as
    host: str  # the daemon's base URL


def ollama_base_url(ollama_host: str | None) -> str:
    """The daemon's base URL from an OLLAMA_HOST value, read the way the ollama CLI reads it.

    Accepts "host", "host:port", ":port", "[::1]:port" and "scheme://host[:port][/path]"; the
    port defaults to 11434 without a scheme and to the scheme's own with one. A bind-all address
    (0.0.0.0, ::), which is how `ollama serve` is often told to listen, means this machine.
    """
    text = (ollama_host or "").strip().strip("\"'").strip()
    scheme, separator, hostport = text.partition("://")
    default_port = _DEFAULT_PORT
    if not separator:
        scheme, hostport = "http", text
    elif scheme in ("http", "https"):
        default_port = "80" if scheme == "http" else "443"
    else:
        raise ConfigError(
            f"OLLAMA_HOST={ollama_host!r} has the scheme {scheme!r}; Ollama speaks http or https.",
            hint="Set OLLAMA_HOST to host:port (or http://host:port), e.g. 127.0.0.1:11434.",
        )
    hostport, _, path = hostport.partition("/")
    split = _split_host_port(hostport)
    if split is None:
        host, port = hostport.strip("[]") or "127.0.0.1", default_port
    else:
        host, port = split
    if not port.isdigit() or int(port) > 65535:
        port = default_port
    address = _ip(host)
    if not host or (address is not None and address.is_unspecified):
        address = _ip("::1" if address is not None and address.version == 6 else "127.0.0.1")
    if address is not None:
        host = f"[{address}]" if address.version == 6 else str(address)
    path = path.rstrip("/")
    return f"{scheme}://{host}:{port}" + (f"/{path}" if path else "")


def _split_host_port(hostport: str) -> tuple[str, str] | None:
    """Go's net.SplitHostPort: None when there is no port (or the host is an unbracketed IPv6)."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0 or hostport[end + 1 : end + 2] != ":":
            return None
        return hostport[1:end], hostport[end + 2 :]
    if hostport.count(":") != 1:
        return None
    host, _, port = hostport.partition(":")
    return host, port


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def register_with_ollama(
    gguf_path: Path,
    name: str,
    *,
    chat_template: str | None,
    system: str | None = None,
    num_ctx: int = 4096,
    host: str | None = None,
    eos_token: str | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> OllamaModel:
    """Create the Ollama model `name` from `gguf_path`, prompted the way the model was trained.

    `chat_template` is the model's Jinja chat template (see modelfile.py); `host` is an
    OLLAMA_HOST value and defaults to the environment's. The GGUF is uploaded only when the
    daemon does not hold a blob with its digest already.
    """
    base_url = ollama_base_url(host if host is not None else os.environ.get("OLLAMA_HOST"))
    family = detect_template_family(chat_template, eos_token=eos_token)
    parameters = ollama_parameters(family, num_ctx)
    digest = sha256_file(gguf_path)
    blob_url = f"{base_url}/api/blobs/sha256:{digest}"
    payload: dict[str, Any] = {
        "model": name,
        "files": {gguf_path.name: f"sha256:{digest}"},
        "template": family.go_template,
        "parameters": parameters,
        "stream": False,
    }
    if system:
        payload["system"] = system

    with requests.Session() as session:
        daemon = _Daemon(session, base_url, name, retry)
        lookup = "look up the GGUF blob"
        found = daemon.send("HEAD", blob_url, what=lookup, timeout=_LOOKUP_TIMEOUT_S)
        if found.status_code == 404:
            upload = "take the GGUF upload"
            uploaded = daemon.send(
                "POST", blob_url, what=upload, timeout=_TRANSFER_TIMEOUT_S, upload=gguf_path
            )
            if uploaded.status_code not in (200, 201):
                raise daemon.refused(uploaded, upload)
        elif found.status_code != 200:
            raise daemon.refused(found, lookup)
        create = "create the model"
        created = daemon.send(
            "POST",
            f"{base_url}/api/create",
            what=create,
            timeout=_TRANSFER_TIMEOUT_S,
            payload=payload,
        )
        if created.status_code != 200 or _body(created).get("status") != "success":
            raise daemon.refused(created, create)
    return OllamaModel(name=name, digest=digest, host=base_url)


class _ServerError(Exception):
    """A 5xx answer: the daemon is up but failing, which a later attempt may get past."""

    def __init__(self, response: requests.Response) -> None:
        super().__init__(response.status_code)
        self.response = response


class _Daemon:
    """One daemon's HTTP calls for one registration, with the retries and the error reporting."""

    def __init__(
        self, session: requests.Session, base_url: str, model: str, retry: RetryPolicy
    ) -> None:
        self.session = session
        self.base_url = base_url
        self.model = model
        self.retry = retry
        # Go's HTTP client, which the ollama CLI uses, never sends loopback traffic through a
        # proxy; requests would, when HTTP_PROXY is set.
        hostname = urlsplit(base_url).hostname or ""
        session.trust_env = not (hostname == "localhost" or _is_loopback(hostname))

    def send(
        self,
        method: str,
        url: str,
        *,
        what: str,
        timeout: float,
        upload: Path | None = None,
        payload: dict[str, Any] | None = None,
    ) -> requests.Response:
        """The daemon's answer below 500, after retrying connection failures and 5xx answers.

        A daemon that takes a request and then goes silent past `timeout` is not retried: it is
        busy or stuck, and sending the same work again would not help either way.
        """

        def attempt() -> requests.Response:
            timeouts = (_CONNECT_TIMEOUT_S, timeout)
            if upload is None:
                response = self.session.request(method, url, json=payload, timeout=timeouts)
            else:
                # Opened per attempt: a retry must send the file from its first byte.
                with upload.open("rb") as body:
                    response = self.session.request(method, url, data=body, timeout=timeouts)
            if response.status_code >= 500:
                raise _ServerError(response)
            return response

        retrying = Retrying(
            retry=retry_if_exception_type((requests.ConnectionError, _ServerError)),
            stop=stop_after_attempt(self.retry.attempts),
            wait=wait_exponential(multiplier=self.retry.first_wait_s, max=self.retry.max_wait_s),
            reraise=True,
        )
        try:
            return retrying(attempt)
        except _ServerError as error:
            raise self.refused(error.response, what) from None
        except requests.ReadTimeout as error:
            raise OllamaRegistrationError(
                f"Ollama at {self.base_url} did not answer within {timeout:.0f} s when asked to "
                f"{what}.",
                hint=_SILENT_HINT,
                host=self.base_url,
                model=self.model,
            ) from error
        except requests.RequestException as error:  # connection refused, reset, DNS, ...
            raise OllamaRegistrationError(
                f"Ollama at {self.base_url} could not be reached to {what} "
                f"({self.retry.attempts} attempts): {error}",
                host=self.base_url,
                model=self.model,
            ) from error

    def refused(self, response: requests.Response, what: str) -> OllamaRegistrationError:
        body = _body(response)
        detail = body.get("error") or response.text[:500] or response.reason
        return OllamaRegistrationError(
            f"Ollama at {self.base_url} did not {what}: HTTP {response.status_code}: {detail}",
            hint=_REFUSED_HINT,
            host=self.base_url,
            model=self.model,
            status=response.status_code,
        )


def _body(response: requests.Response) -> dict[str, object]:
    """The JSON object the daemon answered with; empty when it is not one."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _is_loopback(hostname: str) -> bool:
    address = _ip(hostname)
    return address is not None and address.is_loopback
