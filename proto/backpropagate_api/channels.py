"""How processes reach each other: gRPC channels that carry the stack's token and speak TLS when
it is configured, and what counts as listening on this machine only.

The CLI, the SDK and the trainer's own calls to the safety sidecar all dial through
`open_channel`, so a token or a CA set once reaches every caller. Where the token may go is
decided here too: it crosses a network in clear only with a warning, and never to an endpoint a
`.env` file chose unless that file gave the token as well (`check_token_destination`).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc

from backpropagate_api.errors import ConfigError
from backpropagate_api.setting_sources import dotenv_file, from_dotenv
from backpropagate_api.settings import Settings, TlsSettings
from backpropagate_api.tracing import traced_channel

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
# Metadata that marks a call one of the stack's own services makes (the trainer's watch of its
# safety sidecar): servers keep slots for such calls (grpc_guards.CallLimits).
STACK_CALL = ("x-backpropagate-caller", "stack")
TOKEN_VARIABLE = "BACKPROPAGATE_TOKEN"


def bearer(token: str) -> str:
    """The `authorization` metadata value that carries `token` (grpc_guards.TokenAuth)."""
    return f"Bearer {token}"


def address_host(address: str) -> str:
    """The host of "host:port" ("[::1]:50051" gives "::1")."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]")


def is_loopback(address: str) -> bool:
    """Whether a server bound to `address` is reachable from this machine only. A name other
    than localhost may resolve anywhere, and 0.0.0.0 is every interface: neither is."""
    host = address_host(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(path: Any, what: str) -> bytes:
    try:
        return bytes(path.read_bytes())
    except OSError as exc:
        raise ConfigError(
            f"Cannot read the TLS {what} {path}: {exc.strerror}.",
            hint="Point BACKPROPAGATE_TLS__CERT_FILE / KEY_FILE / CA_FILE at readable PEM files.",
            path=str(path),
        ) from None


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    assert tls.cert_file is not None and tls.key_file is not None
    pair = (_read(tls.key_file, "key"), _read(tls.cert_file, "certificate"))
    return grpc.ssl_server_credentials([pair])


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds `authorization: Bearer <token>` to every call of a channel."""

    def __init__(self, token: str) -> None:
        self.header = (AUTHORIZATION, bearer(token))

    def _call(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        """Any call shape: `request` is the message, or the iterator of a client stream."""
        metadata = [*(details.metadata or ()), self.header]
        return continuation(details._replace(metadata=metadata), request)

    intercept_unary_unary = intercept_unary_stream = _call
    intercept_stream_unary = intercept_stream_stream = _call


def open_channel(
    target: str,
    settings: Settings,
    options: Sequence[tuple[str, Any]] = (),
    token: str | None = None,
) -> grpc.Channel:
    """A channel to `target` that speaks TLS when `settings.tls` says so, sends the token
    (`token`, else the settings' BACKPROPAGATE_TOKEN, else none) and passes the caller's trace
    on."""
    if settings.tls.dials:
        root = _read(settings.tls.ca_file, "CA") if settings.tls.ca_file else None
        channel = grpc.secure_channel(
            target, grpc.ssl_channel_credentials(root_certificates=root), options=list(options)
        )
    else:
        channel = grpc.insecure_channel(target, options=list(options))
    channel = traced_channel(channel)
    secret = token if token is not None else _settings_token(settings)
    if not secret:
        return channel
    if not settings.tls.dials and not is_loopback(target):
        _warn_token_in_clear(target)
    return grpc.intercept_channel(channel, _BearerToken(secret))


@functools.cache
def _warn_token_in_clear(target: str) -> None:
    """Once per address a process dials: whoever is on the network path can read the token."""
    log.warning(
        "The token goes to %s without TLS: anyone on the network path can read it. Set "
        "BACKPROPAGATE_TLS__CA_FILE (or BACKPROPAGATE_TLS__ENABLED=true) where the stack serves "
        "TLS.",
        target,
    )


def _settings_token(settings: Settings) -> str:
    return settings.token.get_secret_value() if settings.token else ""


def _endpoint_variable(settings: Settings, service: str) -> str:
    """The variable that sets `service`'s endpoint: its own, else the shared one."""
    if getattr(settings.endpoints, service):
        return f"BACKPROPAGATE_ENDPOINTS__{service.upper()}"
    return "BACKPROPAGATE_ENDPOINT"


def check_token_destination(settings: Settings, services: Iterable[str]) -> None:
    """ConfigError before anything is dialled if the settings' token would go to one of these
    services' endpoints while a `.env` file chose that endpoint and not the token.

    A `.env` is read from the directory a command runs in, whoever wrote it: one that only points
    the client somewhere else must not collect the token the user exported for their own stack.
    A `.env` that holds the token as well (what `make env` writes) is the user's own."""
    token = _settings_token(settings)
    if not token or from_dotenv(TOKEN_VARIABLE, token):
        return
    for service in services:
        variable, address = _endpoint_variable(settings, service), settings.endpoint_of(service)
        if address and from_dotenv(variable, address):
            raise ConfigError(
                f"{variable}={address} comes from {dotenv_file()}, but {TOKEN_VARIABLE} does "
                "not: the token is not sent to an endpoint that a .env file chose.",
                hint=f"If you wrote that .env, put {TOKEN_VARIABLE} in it too, or set "
                f"{variable} in the environment; if you did not, remove the line.",
                setting=variable,
            )
