"""Where the client sends its token: only to endpoints chosen by the same source as the token.

A `.env` is read from whatever directory a command runs in, a cloned repository's included. One
that points the client at another endpoint must not collect the token the user exported for their
own stack: the client refuses before it dials. A `.env` that holds the token as well (what `make
env` writes) is trusted, and so is an endpoint from the environment. The endpoint here is a real
gRPC server on loopback that records what each call carries, as a stranger's server would.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_cli_errors import assert_user_error, backprop

from backpropagate.connection import Connection
from backpropagate_api.channels import AUTHORIZATION, bearer, open_channel
from backpropagate_api.errors import ConfigError
from backpropagate_api.settings import Settings, TlsSettings

TOKEN = "users-own-token-0123456789abcdef"


class RecordingServer(grpc.ServerInterceptor):  # type: ignore[misc]
    """Keeps the metadata of every call it receives, then answers UNIMPLEMENTED."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []

    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        self.calls.append(dict(details.invocation_metadata))
        return continuation(details)

    def tokens(self) -> list[str]:
        return [call[AUTHORIZATION] for call in self.calls if AUTHORIZATION in call]


@pytest.fixture
def stranger() -> Iterator[tuple[str, RecordingServer]]:
    """The address of a gRPC server that records what it is sent, and its records."""
    recorder = RecordingServer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[recorder])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", recorder
    finally:
        server.stop(grace=0)


def test_an_endpoint_from_a_dotenv_never_receives_the_token_from_the_environment(
    tmp_path: Path, stranger: tuple[str, RecordingServer]
) -> None:
    address, recorder = stranger
    (tmp_path / ".env").write_text(f"BACKPROPAGATE_ENDPOINT={address}\n")

    outcome = backprop(tmp_path, "runs", "list", env={"BACKPROPAGATE_TOKEN": TOKEN})

    assert_user_error(outcome, "INPUT_CONFIG_INVALID")
    assert f"BACKPROPAGATE_ENDPOINT={address} comes from" in outcome.stderr
    assert ".env" in outcome.stderr and "BACKPROPAGATE_TOKEN" in outcome.stderr
    assert TOKEN not in outcome.stderr
    assert recorder.calls == []  # refused before dialling: nothing reached the endpoint


def test_a_dotenv_holding_both_the_endpoint_and_the_token_is_used_as_written(
    tmp_path: Path, stranger: tuple[str, RecordingServer]
) -> None:
    address, recorder = stranger
    (tmp_path / ".env").write_text(
        f"BACKPROPAGATE_ENDPOINT={address}\nBACKPROPAGATE_TOKEN=the-dotenv-token\n"
    )

    backprop(tmp_path, "runs", "list")

    assert recorder.tokens() and set(recorder.tokens()) == {bearer("the-dotenv-token")}


def test_an_endpoint_from_the_environment_receives_the_token_from_the_environment(
    tmp_path: Path, stranger: tuple[str, RecordingServer]
) -> None:
    address, recorder = stranger

    backprop(tmp_path, "runs", "list", endpoint=address, env={"BACKPROPAGATE_TOKEN": TOKEN})

    assert recorder.tokens() and set(recorder.tokens()) == {bearer(TOKEN)}


def test_one_service_endpoint_from_a_dotenv_is_enough_to_refuse_an_sdk_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stranger: tuple[str, RecordingServer]
) -> None:
    address, recorder = stranger
    for service in ("DATAPREP", "SAFETY", "EXPORT"):
        monkeypatch.setenv(f"BACKPROPAGATE_ENDPOINTS__{service}", address)
    monkeypatch.setenv("BACKPROPAGATE_TOKEN", TOKEN)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(f"BACKPROPAGATE_ENDPOINTS__TRAINER={address}\n")

    with pytest.raises(ConfigError) as refused:
        Connection.open(Settings(), workers=False)

    assert "BACKPROPAGATE_ENDPOINTS__TRAINER" in refused.value.message
    assert "BACKPROPAGATE_TOKEN" in refused.value.hint
    assert recorder.calls == []


@pytest.mark.parametrize(
    ("target", "tls", "warned"),
    [
        ("192.0.2.10:50961", TlsSettings(), True),
        ("trainer.example:50962", TlsSettings(), True),
        ("127.0.0.1:50051", TlsSettings(), False),
        ("localhost:50051", TlsSettings(), False),
        ("192.0.2.10:50051", TlsSettings(enabled=True), False),
    ],
)
def test_a_token_sent_beyond_loopback_without_tls_is_warned_about(
    caplog: pytest.LogCaptureFixture, target: str, tls: TlsSettings, warned: bool
) -> None:
    # A channel dials nothing until its first call: no traffic leaves this machine here.
    settings = Settings(token=TOKEN, tls=tls)
    with caplog.at_level(logging.WARNING):
        open_channel(target, settings).close()

    warnings = [record.getMessage() for record in caplog.records if target in record.getMessage()]
    assert bool(warnings) is warned
    for warning in warnings:
        assert "without TLS" in warning and "BACKPROPAGATE_TLS__" in warning
        assert TOKEN not in warning
