"""Secrets never reach a user or a log: each kind of credential is fed through each path (the
text of an error, a log line, a logged traceback, an unexpected exception a client is told
about over a real gRPC server) and only *** comes out."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

import backpropagate  # noqa: F401  # the client first: grpc_errors imports its generated code
from backpropagate_api.errors import NotFoundError
from backpropagate_api.grpc_errors import error_from_rpc, translate_errors
from backpropagate_api.redaction import redact
from backpropagate_api.v1 import common_pb2, trainer_pb2
from backpropagate_services.common.logs import LOG_FORMAT, RedactingFormatter, RunIdFilter
from backpropagate_services.common.records import load_record, save_record
from backpropagate_services.common.store.local import LocalDirStore

# (text holding a secret, the secret itself, what redaction leaves)
SECRETS = [
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig", "eyJhbGciOiJIUzI1NiJ9", "Bearer ***"),
    ("redis://:r3disPass@cache:6379/0", "r3disPass", "redis://:***@cache:6379/0"),
    ("https://alice:s3cret@hub.example/model", "s3cret", "https://alice:***@hub.example/model"),
    ("key sk-proj-abcdefghijklmnopqrstuvwx used", "sk-proj-abcdefghijklmnopqrstuvwx", "key ***"),
    ("login with hf_abcdefghijklmnopqrstuvwxyz now", "hf_abcdefghijklmnopqrstuvwxyz", "***"),
    ("aws id AKIAIOSFODNN7EXAMPLE here", "AKIAIOSFODNN7EXAMPLE", "aws id *** here"),
    ("password=hunter2 and more", "hunter2", "password=*** and more"),
    ("GET /v1?token=t0k3nValue&page=2", "t0k3nValue", "token=***&page=2"),
    ("api_key: abc123def456", "abc123def456", "api_key: ***"),
    ('{"password": "hunter2", "user": "bob"}', "hunter2", '"password": "***"'),
    ("aws_secret_access_key=wJalrXUtnFEMI/K7MDENG", "wJalrXUtnFEMI", "=***"),
    ("secret_key=abc123 then more", "abc123", "secret_key=*** then more"),
    ("S3 Access-Key: AKIAXYZ", "AKIAXYZ", "Access-Key: ***"),
    ("password = hunter2", "hunter2", "password = ***"),
    ("Authorization: Basic dXNlcjpodW50ZXIy", "dXNlcjpodW50ZXIy", "Authorization: Basic ***"),
    ("client secret=abc123xyz here", "abc123xyz", "secret=*** here"),
    ("gh ghp_0123456789abcdefghijABCDEFGHIJ012345 ok", "ghp_0123456789abcdefghij", "gh *** ok"),
    ("slack xoxb-1234567890-0987654321-AbCdEfGhIjKl", "AbCdEfGhIjKl", "slack ***"),
    ('password="correct horse battery staple"', "horse battery", 'password="***"'),
    ("token='two words' then", "words", "token='***' then"),
    ("redis://:p@ssw0rd@cache:6379/0", "ssw0rd", "redis://:***@cache:6379/0"),
]
IDS = [text.split()[0][:12] for text, _, _ in SECRETS]


@pytest.mark.parametrize(("text", "secret", "left"), SECRETS, ids=IDS)
def test_redact_replaces_each_kind_of_secret(text: str, secret: str, left: str) -> None:
    redacted = redact(text)
    assert secret not in redacted
    assert left in redacted


@pytest.mark.parametrize(
    "text",
    [
        "tokens per step: 512, see hf_hub docs",
        "max_tokens=512 at https://huggingface.co/HuggingFaceTB/SmolLM2-135M",
        "sk-short and a ASIA trip",
        "basic settings: batch 4, the secret sauce, ghp_short, xoxb",
        "user@example.com wrote https://example.com/a@b",
    ],
)
def test_redact_leaves_ordinary_text_alone(text: str) -> None:
    assert redact(text) == text


@pytest.mark.parametrize(("text", "secret", "left"), SECRETS, ids=IDS)
def test_an_error_redacts_its_message_hint_and_context(text: str, secret: str, left: str) -> None:
    error = NotFoundError(f"failed: {text}", hint=text, source=text)

    assert secret not in error.message + error.hint + "".join(error.context.values())


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """A logger handled the way services configure theirs."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RunIdFilter())
    handler.setFormatter(RedactingFormatter(LOG_FORMAT))
    logger = logging.getLogger("redaction-test")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize(("text", "secret", "left"), SECRETS, ids=IDS)
def test_log_lines_and_their_tracebacks_are_redacted(
    log_output: io.StringIO, text: str, secret: str, left: str
) -> None:
    logger = logging.getLogger("redaction-test")
    logger.warning("connecting with %s", text)
    try:
        raise ConnectionError(f"refused: {text}")
    except ConnectionError:
        logger.exception("the store failed")

    written = log_output.getvalue()
    assert "Traceback" in written and "ConnectionError: refused:" in written
    assert secret not in written
    assert written.count(left) >= 2


class LeakyServicer:
    """A servicer whose call fails with an exception that quotes a credential."""

    def __init__(self, text: str) -> None:
        self.text = text

    @translate_errors
    def Call(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        raise RuntimeError(f"could not reach {self.text}")


@pytest.mark.parametrize(("text", "secret", "left"), SECRETS[:3], ids=IDS[:3])
def test_an_unexpected_exception_reaches_the_client_as_a_code_and_a_log_reference(
    caplog: pytest.LogCaptureFixture, text: str, secret: str, left: str
) -> None:
    servicer = LeakyServicer(text)
    handler = grpc.method_handlers_generic_handler(
        "test.Leaky", {"Call": grpc.unary_unary_rpc_method_handler(servicer.Call)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/test.Leaky/Call")
            with caplog.at_level(logging.ERROR), pytest.raises(grpc.RpcError) as failed:
                call(b"")
    finally:
        server.stop(grace=0)

    error = error_from_rpc(failed.value)
    assert error.code == "INTERNAL"
    assert "could not reach" not in error.message and secret not in error.message
    reference = error.context["reference"]
    assert reference in error.message
    [logged] = [record for record in caplog.records if reference in record.getMessage()]
    assert logged.exc_info is not None  # the whole story is in the log, under that reference


@pytest.mark.parametrize(("text", "secret", "left"), SECRETS, ids=IDS)
def test_a_stored_record_holds_no_secret_a_caller_put_in_its_config(
    text: str, secret: str, left: str, tmp_path: Path
) -> None:
    store = LocalDirStore(tmp_path)
    record = trainer_pb2.RunRecord(
        run_id="run-20261206T130000-abcdef",
        base_model=text,
        config=trainer_pb2.TrainConfig(base_model=text, target_modules=["q_proj", text]),
        error=common_pb2.ErrorDetail(message=text, context={"field": text}),
    )
    save_record(store, "runs/run-20261206T130000-abcdef/run.json", record)

    stored = (tmp_path / "runs/run-20261206T130000-abcdef/run.json").read_text()
    assert secret not in stored
    loaded = load_record(
        store, "runs/run-20261206T130000-abcdef/run.json", trainer_pb2.RunRecord, "run"
    )
    assert left in loaded.config.base_model and left in loaded.config.target_modules[1]
    assert loaded.config.target_modules[0] == "q_proj" and loaded.run_id == record.run_id
