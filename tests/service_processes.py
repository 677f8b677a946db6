"""Start our services as separate `backprop serve` processes against a real Redis and S3.

Drills that kill, stop and restart trainer processes keep the API side of the stack in the test
process (`control_plane`): it stays up throughout, and reads the very queue and store the
workers write.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from subprocess import Popen
from typing import TypeVar
from unittest import mock

import grpc
import servers
from grpc_health.v1 import health_pb2, health_pb2_grpc

from backpropagate.connection import Connection
from backpropagate.workflows import submit_multi_run, submit_train, upload_dataset
from backpropagate_api.errors import DependencyError
from backpropagate_api.layout import run_events_channel
from backpropagate_api.settings import Settings
from backpropagate_api.statuses import TERMINAL_STATUSES
from backpropagate_api.v1 import trainer_pb2
from backpropagate_services.common.records import from_json
from backpropagate_services.common.runtime import Runtime
from backpropagate_services.stack import SERVICES, RunningStack, start_stack

T = TypeVar("T")


def serving(address: str) -> bool:
    """True once the server at `address` answers the standard health check with SERVING."""
    try:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def stack_env(
    redis_url: str, s3_endpoint: str, model_cache: Path, home: Path, **settings: str
) -> dict[str, str]:
    """Environment of a stack with its own Redis namespace and bucket; `settings` are extra
    BACKPROPAGATE_ variables without the prefix (e.g. QUEUE__VISIBILITY_TIMEOUT_SECONDS)."""
    return {
        **os.environ,
        "BACKPROPAGATE_HOME": str(home),
        "BACKPROPAGATE_MODEL_CACHE": str(model_cache),
        "BACKPROPAGATE_QUEUE__BACKEND": "redis",
        "BACKPROPAGATE_QUEUE__REDIS_URL": redis_url,
        "BACKPROPAGATE_QUEUE__NAMESPACE": f"it-{uuid.uuid4().hex[:8]}",
        "BACKPROPAGATE_STORE__BACKEND": "s3",
        "BACKPROPAGATE_STORE__S3_ENDPOINT": s3_endpoint,
        "BACKPROPAGATE_STORE__S3_BUCKET": f"it-{uuid.uuid4().hex[:8]}",
        "BACKPROPAGATE_STORE__S3_ACCESS_KEY": "test-access-key",  # moto takes any pair
        "BACKPROPAGATE_STORE__S3_SECRET_KEY": "test-secret-key",
        **{f"BACKPROPAGATE_{name}": value for name, value in settings.items()},
    }


def serve(
    service: str, address: str, env: dict[str, str], log_path: Path | None = None
) -> AbstractContextManager[Popen[bytes]]:
    """`backprop serve <service>` on `address`, ready once its health check says SERVING; its
    log is kept at `log_path` if given."""
    backprop = str(Path(sys.executable).parent / "backprop")
    return servers.running(
        [backprop, "serve", service, "--listen", address],
        ready=lambda: serving(address),
        what=f"backprop serve {service}",
        timeout=120,
        env=env,
        log_path=log_path,
    )


def settings_of(env: Mapping[str, str]) -> Settings:
    """The settings a service started with `env` reads."""
    with mock.patch.dict(os.environ, env, clear=True):
        return Settings()


class ControlPlane:
    """The stack's API (dataprep and the trainer service, no workers) and its queue and store,
    as a test uses them: submit a run, wait for its events and record, read what it left."""

    def __init__(self, address: str, runtime: Runtime) -> None:
        # Every service named: a connection missing one would start an embedded stack here.
        self.connection = Connection(dict.fromkeys(SERVICES, address), embedded=False)
        self.queue = runtime.queue
        self.store = runtime.store

    def submit(self, dataset: Path, config: trainer_pb2.TrainConfig) -> str:
        """Upload `dataset` and queue a run on it; its run id."""
        dataset_id = upload_dataset(self.connection, dataset).dataset_id
        return submit_train(self.connection, dataset_id, config)

    def submit_campaign(
        self,
        dataset: Path,
        config: trainer_pb2.TrainConfig,
        multi_run: trainer_pb2.MultiRunConfig,
    ) -> str:
        """Upload `dataset` and queue a campaign whose runs sample it; its id."""
        dataset_id = upload_dataset(self.connection, dataset).dataset_id
        return submit_multi_run(self.connection, [dataset_id], config, multi_run)

    def record(self, run_id: str) -> trainer_pb2.RunRecord:
        request = trainer_pb2.GetRunRequest(run_id=run_id)
        return self.connection.call("trainer", self.connection.trainer.GetRun, request)

    def events(self, run_id: str) -> list[trainer_pb2.RunEvent]:
        """Every event the run's channel holds now, even those after its terminal one (which
        WatchRun would not show)."""
        channel = run_events_channel(run_id)
        return [
            from_json(event.data, trainer_pb2.RunEvent) for event in self.queue.read(channel, "", 0)
        ]

    def wait_for_event(
        self,
        run_id: str,
        matches: Callable[[trainer_pb2.RunEvent], bool],
        what: str,
        *,
        timeout: float = 180.0,
        process: Popen[bytes] | None = None,
    ) -> trainer_pb2.RunEvent:
        """The first event of the run that `matches`, once published; fails early if the
        `process` expected to publish it exits. Rides out a Redis outage."""

        def first_match() -> trainer_pb2.RunEvent | None:
            return next(filter(matches, self.events(run_id)), None)

        return wait_for(first_match, what, timeout, process)

    def wait_for_end(
        self, run_id: str, *, timeout: float = 240.0, process: Popen[bytes] | None = None
    ) -> trainer_pb2.RunRecord:
        """The run's record once it has ended (succeeded, failed or cancelled)."""

        def ended() -> trainer_pb2.RunRecord | None:
            record = self.record(run_id)
            return record if record.status in TERMINAL_STATUSES else None

        return wait_for(ended, f"the end of run {run_id}", timeout, process)


def wait_for(
    found: Callable[[], T | None], what: str, timeout: float, process: Popen[bytes] | None
) -> T:
    """What `found` returns once it is not None, polled (a second's fraction apart: each look
    is a Redis or S3 request) through outages of Redis or S3."""
    result: list[T] = []

    def ready() -> bool:
        try:
            value = found()
        except DependencyError:  # Redis or S3 away for a moment (a drill): look again
            return False
        result[:] = [] if value is None else [value]
        return bool(result)

    servers.wait_until(ready, what=what, timeout=timeout, process=process, interval=0.3)
    return result[0]


@contextmanager
def control_plane(env: Mapping[str, str]) -> Iterator[ControlPlane]:
    """Dataprep and the trainer's API served from this process, with no workers: they stay up
    while a drill kills, stops and restarts the trainer processes that do the work."""
    settings = settings_of(env)
    stack = start_stack(settings, ["dataprep", "trainer"], "127.0.0.1:0", start_workers=False)
    plane = ControlPlane(stack.address, stack.runtime)
    try:
        yield plane
    finally:
        plane.connection.close()
        stack.stop()


@contextmanager
def in_process_stack(
    settings: Settings, services: list[str], *, start_workers: bool = True
) -> Iterator[RunningStack]:
    """`services` served from this process on a free loopback port, stopped at the end."""
    stack = start_stack(settings, services, "127.0.0.1:0", start_workers=start_workers)
    try:
        yield stack
    finally:
        stack.stop(grace=0)


@contextmanager
def connected(address: str, services: list[str]) -> Iterator[Connection]:
    """A client of `services` at `address` (never an embedded stack), closed at the end."""
    client = Connection(dict.fromkeys(services, address), embedded=False)
    try:
        yield client
    finally:
        client.close()
