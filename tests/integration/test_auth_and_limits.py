"""Who may call a stack, and how many calls it takes at once, against `backprop serve` processes.

A server that would listen beyond loopback without a token refuses to start; a server with a
token answers every call without it (or with another) UNAUTHENTICATED before any servicer runs,
while its health check stays open; the embedded default listens on loopback with a token of its
own. A hundred watches that never read are refused beyond the stream limit, and the health
check and an ordinary call still answer at once; the trainer's own watch of its safety sidecar
gets a slot kept for it while callers hold all the others. An upload or an adapter import that
stops sending is ended after the idle timeout and gives its slot back. A stack serving TLS
answers only clients that trust its CA. A stack on S3 needs its credentials set: the code holds
no default pair.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import servers
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_processes import serve, stack_env

from backpropagate.connection import Connection
from backpropagate.workflows import upload_dataset
from backpropagate_api.channels import is_loopback, open_channel
from backpropagate_api.errors import (
    AuthFailedError,
    BackpropagateError,
    ServerBusyError,
    ServiceUnavailableError,
)
from backpropagate_api.grpc_errors import error_from_rpc
from backpropagate_api.settings import ServerSettings, Settings, TlsSettings
from backpropagate_api.v1 import common_pb2, dataprep_pb2, safety_pb2, safety_pb2_grpc, trainer_pb2
from backpropagate_services.stack import SERVICES
from backpropagate_services.trainer.runtime.safety_monitor import SafetyMonitor

TOKEN = "test-token-0123456789abcdef"


def backprop() -> str:
    return str(Path(sys.executable).parent / "backprop")


def client(address: str, token: str | None) -> Connection:
    """A connection that sends `token` (None: no token at all)."""
    return Connection(dict.fromkeys(SERVICES, address), False, Settings(), token=token or "")


def health(address: str, timeout: float = 5.0) -> int:
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service="")
        return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout).status)


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.3.4.5:1", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        ("192.168.1.20:50051", False),
        ("trainer.example:50051", False),
    ],
)
def test_what_counts_as_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_serving_beyond_loopback_without_a_token_refuses_to_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "BACKPROPAGATE_TOKEN"}
    env["BACKPROPAGATE_HOME"] = str(tmp_path)
    port = servers.free_port()
    done = subprocess.run(
        [backprop(), "serve", "all", "--listen", f"0.0.0.0:{port}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done
    assert "INPUT_AUTH_REQUIRED" in done.stderr and "BACKPROPAGATE_TOKEN" in done.stderr, done
    assert "Traceback" not in done.stderr
    with socket.socket() as probe:  # never bound
        assert probe.connect_ex((servers.LOOPBACK, port)) != 0


def test_a_stack_on_s3_without_credentials_refuses_to_start_naming_the_settings(
    s3_endpoint: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKPROPAGATE_STORE__")}
    env |= {
        "BACKPROPAGATE_HOME": str(tmp_path),
        "BACKPROPAGATE_STORE__BACKEND": "s3",
        "BACKPROPAGATE_STORE__S3_ENDPOINT": s3_endpoint,  # moto would take any pair
    }
    done = subprocess.run(
        [backprop(), "serve", "all", "--listen", servers.free_address()],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done
    assert "INPUT_CONFIG_INVALID" in done.stderr, done
    assert "BACKPROPAGATE_STORE__S3_ACCESS_KEY" in done.stderr, done
    assert "BACKPROPAGATE_STORE__S3_SECRET_KEY" in done.stderr, done
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def guarded(
    redis_url: str, s3_endpoint: str, model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`backprop serve all` with a token, on loopback."""
    home = tmp_path_factory.mktemp("guarded")
    env = stack_env(redis_url, s3_endpoint, model_cache, home, TOKEN=TOKEN)
    address = servers.free_address()
    with serve("all", address, env, log_path=home / "serve.log"):
        yield address


def every_kind_of_call(connection: Connection, dataset: Path) -> dict[str, Callable[[], object]]:
    """One call of each shape: unary, server-streaming, client-streaming."""
    trainer = connection.trainer
    return {
        "ListRuns": lambda: connection.call(
            "trainer", trainer.ListRuns, trainer_pb2.ListRunsRequest()
        ),
        "WatchRun": lambda: list(
            connection.stream("trainer", trainer.WatchRun, trainer_pb2.WatchRunRequest(run_id="r"))
        ),
        "UploadDataset": lambda: upload_dataset(connection, dataset),
        "InspectDataset": lambda: connection.call(
            "dataprep",
            connection.dataprep.InspectDataset,
            dataprep_pb2.InspectDatasetRequest(dataset_id="ds-0"),
        ),
    }


@pytest.mark.parametrize("token", [None, "not-the-token", TOKEN + "x", TOKEN[:-1]])
def test_calls_without_the_stacks_token_are_unauthenticated(
    guarded: str, token: str | None, quickstart: Path
) -> None:
    connection = client(guarded, token)
    try:
        for name, call in every_kind_of_call(connection, quickstart).items():
            with pytest.raises(AuthFailedError) as caught:
                call()
            assert caught.value.code == "INPUT_AUTH_FAILED", name
            assert "BACKPROPAGATE_TOKEN" in caught.value.hint, name
            assert TOKEN not in str(caught.value), name
    finally:
        connection.close()
    assert health(guarded) == health_pb2.HealthCheckResponse.SERVING  # probes need no token


def test_calls_with_the_token_are_answered(guarded: str, quickstart: Path) -> None:
    connection = client(guarded, TOKEN)
    try:
        uploaded = upload_dataset(connection, quickstart)
        assert uploaded.num_examples > 0
        runs = connection.call(
            "trainer", connection.trainer.ListRuns, trainer_pb2.ListRunsRequest()
        )
        assert list(runs.runs) == []
    finally:
        connection.close()
    # Nothing the refused calls sent was stored: only the one upload made with the token.
    unauthenticated = client(guarded, None)
    with pytest.raises(AuthFailedError):
        upload_dataset(unauthenticated, quickstart)
    unauthenticated.close()


def test_the_embedded_default_takes_calls_only_with_its_own_token(tmp_path: Path) -> None:
    connection = Connection.open(Settings(home=tmp_path), workers=False)
    try:
        assert connection.embedded and connection.token and len(connection.token) >= 32
        address = connection.addresses["trainer"]
        assert address.startswith("127.0.0.1:")
        connection.call(
            "trainer", connection.trainer.ListRuns, trainer_pb2.ListRunsRequest()
        )  # its own client is let in
        stranger = client(address, None)
        with pytest.raises(AuthFailedError):
            stranger.call("trainer", stranger.trainer.ListRuns, trainer_pb2.ListRunsRequest())
        stranger.close()
    finally:
        connection.close()


def test_a_hundred_abusive_watchers_leave_health_and_ordinary_calls_answering(
    redis_url: str, s3_endpoint: str, model_cache: Path, tmp_path: Path
) -> None:
    env = stack_env(redis_url, s3_endpoint, model_cache, tmp_path, SAFETY__SOURCE="host")
    address = servers.free_address()
    limits = ServerSettings()
    # The safety sidecar alone: no trainer of the stack's own holds a stream of it.
    with serve("safety", address, env, log_path=tmp_path / "serve.log"):
        channel = grpc.insecure_channel(address)
        stub = safety_pb2_grpc.SafetyServiceStub(channel)
        # Watches that never read what they are sent.
        watchers = [stub.Watch(safety_pb2.WatchSafetyRequest()) for _ in range(100)]
        try:
            expected = 100 - limits.max_concurrent_streams
            servers.wait_until(
                lambda: len(_refused_busy(watchers)) >= expected,
                what=f"{expected} watches refused",
                timeout=10,
            )
            assert len(_refused_busy(watchers)) == expected
            started = time.monotonic()
            assert health(address, timeout=2) == health_pb2.HealthCheckResponse.SERVING
            ordinary = client(address, None)
            snapshot = ordinary.call(
                "safety", ordinary.safety.Snapshot, safety_pb2.SnapshotRequest()
            )
            assert time.monotonic() - started < 2.0
            assert snapshot.source == "host"
            with pytest.raises(ServerBusyError) as caught:
                list(
                    ordinary.stream(
                        "safety", ordinary.safety.Watch, safety_pb2.WatchSafetyRequest()
                    )
                )
            assert caught.value.retryable
            ordinary.close()
        finally:
            for call in watchers:
                call.cancel()
            channel.close()
        # The watchers gone, their slots are free again.
        again = client(address, None)
        servers.wait_until(lambda: _one_snapshot(again), what="a watch after the abuse", timeout=10)
        again.close()


def _refused_busy(calls: list[grpc.Call]) -> list[grpc.Call]:
    """The calls that ended RESOURCE_EXHAUSTED so far (an accepted watch runs on)."""
    return [
        call
        for call in calls
        if call.done() and call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    ]


def _one_snapshot(connection: Connection) -> bool:
    try:
        stream = connection.stream(
            "safety", connection.safety.Watch, safety_pb2.WatchSafetyRequest()
        )
        next(iter(stream))
        return True
    except BackpropagateError:
        return False


def test_the_trainers_safety_watch_gets_a_slot_while_callers_hold_all_the_others(
    redis_url: str, s3_endpoint: str, model_cache: Path, tmp_path: Path
) -> None:
    env = stack_env(
        redis_url,
        s3_endpoint,
        model_cache,
        tmp_path,
        TOKEN=TOKEN,
        SAFETY__SOURCE="host",
        SERVER__MAX_CONCURRENT_STREAMS="4",
    )
    address = servers.free_address()
    with serve("safety", address, env, log_path=tmp_path / "serve.log"):
        # Callers with the stack's token: they may call, but are not the stack's trainer.
        callers = client(address, TOKEN)
        watchers = [callers.safety.Watch(safety_pb2.WatchSafetyRequest()) for _ in range(20)]
        # The trainer's own follower, dialling as the trainer does.
        monitor = SafetyMonitor(
            address, 0.2, dial=lambda target: open_channel(target, Settings(token=TOKEN))
        )
        try:
            servers.wait_until(
                lambda: len(_refused_busy(watchers)) >= 16,
                what="the callers' watches beyond the limit refused",
                timeout=10,
            )
            monitor.start()
            servers.wait_until(lambda: monitor.connected, what="the trainer's watch", timeout=15)
            assert monitor.level != common_pb2.SAFETY_LEVEL_UNSPECIFIED
            with pytest.raises(ServerBusyError):  # the kept slot is no slot for another caller
                next(
                    iter(
                        callers.stream(
                            "safety", callers.safety.Watch, safety_pb2.WatchSafetyRequest()
                        )
                    )
                )
        finally:
            monitor.stop()
            for call in watchers:
                call.cancel()
            callers.close()


def test_an_upload_or_import_that_stops_sending_ends_after_the_idle_timeout_and_frees_its_slot(
    redis_url: str, s3_endpoint: str, model_cache: Path, tmp_path: Path
) -> None:
    env = stack_env(
        redis_url,
        s3_endpoint,
        model_cache,
        tmp_path,
        SERVER__MAX_CONCURRENT_CALLS="2",
        SERVER__WATCH_IDLE_SECONDS="3",
        # No sidecar answers there: the trainer's watch of it holds no slot of this server.
        ENDPOINTS__SAFETY=servers.free_address(),
    )
    address = servers.free_address()
    with serve("all", address, env, log_path=tmp_path / "serve.log"):
        connection = client(address, None)
        never = threading.Event()

        def header_then_nothing(header: object) -> Iterator[object]:
            yield header
            never.wait(60)  # the client is still there, but sends nothing more

        upload_header = dataprep_pb2.UploadDatasetHeader(filename="rows.jsonl")
        import_header = trainer_pb2.ImportAdapterHeader(base_model="smollm2")
        started = time.monotonic()
        stalled = [
            connection.dataprep.UploadDataset.future(
                header_then_nothing(dataprep_pb2.UploadDatasetRequest(header=upload_header)),
                timeout=20,
            ),
            connection.trainer.ImportAdapter.future(
                header_then_nothing(trainer_pb2.ImportAdapterRequest(header=import_header)),
                timeout=20,
            ),
        ]
        try:
            servers.wait_until(
                lambda: _busy(connection), what="the two stalled calls holding both slots"
            )
            answers = []
            for call in stalled:
                with pytest.raises(grpc.RpcError) as ended:
                    call.result()
                answers.append(error_from_rpc(ended.value))
            assert [answer.code for answer in answers] == ["INPUT_STREAM_IDLE"] * 2
            assert all("3 s" in answer.message for answer in answers), answers
            assert time.monotonic() - started < 15
            runs = connection.call(
                "trainer", connection.trainer.ListRuns, trainer_pb2.ListRunsRequest()
            )
            assert list(runs.runs) == []  # their slots are free again
        finally:
            never.set()
            for call in stalled:
                call.cancel()
            connection.close()


def _busy(connection: Connection) -> bool:
    """Whether an ordinary call is refused for want of a slot."""
    try:
        connection.call("trainer", connection.trainer.ListRuns, trainer_pb2.ListRunsRequest())
    except ServerBusyError:
        return True
    return False


def write_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signs for 127.0.0.1: (ca, cert, key) PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test CA"))
        .issuer_name(name("test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def test_a_stack_serving_tls_answers_clients_that_trust_its_ca_only(
    redis_url: str, s3_endpoint: str, model_cache: Path, tmp_path: Path
) -> None:
    ca, cert, key = write_certificates(tmp_path)
    env = stack_env(
        redis_url,
        s3_endpoint,
        model_cache,
        tmp_path,
        TOKEN=TOKEN,
        TLS__CERT_FILE=str(cert),
        TLS__KEY_FILE=str(key),
    )
    address = servers.free_address()
    probe = [sys.executable, "-m", "backpropagate_services.common.healthcheck", address]
    with servers.running(
        [backprop(), "serve", "all", "--listen", address],
        ready=lambda: (
            subprocess.run([*probe, "--ca", str(ca)], capture_output=True).returncode == 0
        ),
        what="backprop serve all over TLS",
        timeout=120,
        env=env,
        log_path=tmp_path / "serve.log",
    ):
        trusting = Connection(
            dict.fromkeys(SERVICES, address), False, Settings(tls=TlsSettings(ca_file=ca)), TOKEN
        )
        runs = trusting.call("trainer", trusting.trainer.ListRuns, trainer_pb2.ListRunsRequest())
        assert list(runs.runs) == []
        trusting.close()
        plain = client(address, TOKEN)  # no TLS: the handshake fails, nothing is answered
        with pytest.raises(ServiceUnavailableError):
            plain.call("trainer", plain.trainer.ListRuns, trainer_pb2.ListRunsRequest(), timeout=5)
        plain.close()
        assert subprocess.run(probe, capture_output=True).returncode == 1
