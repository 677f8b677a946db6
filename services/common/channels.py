"""How processes reach each other: gRPC channels that carry the stack's token and speak TLS when
it is configured, and what counts as listening on this machine only.

The CLI, the SDK and the trainer's own calls to the safety sidecar all dial through
`open_channel`, so a token or a CA set once reaches every caller.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from backpropagate_services.common.errors import ConfigError
from backpropagate_services.common.settings import Settings, TlsSettings

AUTHORIZATION = "authorization"


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
    """A channel to `target` that speaks TLS when `settings.tls` says so and sends the token:
    `token`, else the settings' (BACKPROPAGATE_TOKEN), else none."""
    if settings.tls.dials:
        root = _read(settings.tls.ca_file, "CA") if settings.tls.ca_file else None
        channel = grpc.secure_channel(
            target, grpc.ssl_channel_credentials(root_certificates=root), options=list(options)
        )
    else:
        channel = grpc.insecure_channel(target, options=list(options))
    secret = token if token is not None else _settings_token(settings)
    if not secret:
        return channel
    return grpc.intercept_channel(channel, _BearerToken(secret))


def _settings_token(settings: Settings) -> str:
    return settings.token.get_secret_value() if settings.token else ""
