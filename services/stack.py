"""Runs one service or all of them in this process: `backprop serve` and the embedded default.

`docker compose` runs one service per container; the embedded default runs all four in the
client's process with the in-process queue and a local artifact directory. Both go through
`start_stack`, so the code under test is the code users run.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from dataclasses import dataclass, field

import grpc

from backpropagate_api.channels import address_host
from backpropagate_api.errors import ConfigError
from backpropagate_api.setting_names import unknown_variables
from backpropagate_api.settings import Settings
from backpropagate_services.common.grpc_server import add_standard_services, bind_server
from backpropagate_services.common.jobs import JobWorker
from backpropagate_services.common.logs import quiet_library_output
from backpropagate_services.common.runtime import Runtime
from backpropagate_services.common.service import ServiceHandle
from backpropagate_services.common.telemetry import Telemetry, start_telemetry

log = logging.getLogger(__name__)

SERVICES = ("dataprep", "trainer", "safety", "export")


@dataclass
class RunningStack:
    server: grpc.Server
    port: int
    host: str
    handles: list[ServiceHandle]
    runtime: Runtime
    telemetry: Telemetry
    workers_started: bool = field(default=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def token(self) -> str | None:
        """The token its callers must send (None: it takes calls without one)."""
        token = self.runtime.settings.token
        return token.get_secret_value() if token else None

    def start_workers(self) -> None:
        """Start the background workers (job workers, the safety follower), once."""
        if self.workers_started:
            return
        self.workers_started = True
        for handle in self.handles:
            for worker in handle.workers:
                worker.start()

    def wait(self) -> None:
        self.server.wait_for_termination()

    def wait_until_idle(self, idle_seconds: float, poll_seconds: float = 1.0) -> None:
        """Return once no job worker has had a job for `idle_seconds` (a detached embedded
        worker's lifetime: it ends when the work it was started for is done)."""
        job_workers = [w for h in self.handles for w in h.workers if isinstance(w, JobWorker)]
        while not all(worker.idle_seconds() >= idle_seconds for worker in job_workers):
            time.sleep(poll_seconds)

    def stop(self, grace: float = 2.0) -> None:
        for handle in self.handles:
            for worker in handle.workers:
                worker.stop()
        self.server.stop(grace).wait()
        self.telemetry.stop()
        self.runtime.close()


def torchrun_rank(service: str, settings: Settings) -> int | None:
    """Under torchrun (TORCHELASTIC_RUN_ID set), `backprop serve trainer` is one rank of one job
    across nodes (docs/scaling-out.md): it serves nothing, trains the job with the other ranks
    and returns its exit code. None for any other service or launch. The trainer's module is
    loaded by name, as the servicers are, so no other service's image needs the trainer."""
    if service != "trainer" or "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    ranks = importlib.import_module(f"backpropagate_services.{service}.runtime.rank_process")
    exit_code: int = ranks.run_ranks(settings)
    return exit_code


def _create(name: str, runtime: Runtime) -> ServiceHandle:
    module = importlib.import_module(f"backpropagate_services.{name}.server")
    handle: ServiceHandle = module.create(runtime)
    return handle


def _trace_name(services: list[str]) -> str:
    """What traces call this process: backpropagate-trainer, or backpropagate for all four."""
    if set(services) == set(SERVICES):
        return "backpropagate"
    return f"backpropagate-{'+'.join(services)}"


def start_stack(
    settings: Settings,
    services: list[str],
    address: str | None = None,
    *,
    start_workers: bool = True,
) -> RunningStack:
    """Serve `services` on `address`; `start_workers=False` serves the API only (a client
    that reads records and events, and must not take jobs it would not see through)."""
    unknown = sorted(set(services) - set(SERVICES))
    if unknown or not services:
        raise ConfigError(
            f"Unknown service(s) {unknown}; choose from {', '.join(SERVICES)} or 'all'.",
        )
    quiet_library_output()
    for variable in unknown_variables():  # a typo in a setting's name changes nothing: say so
        log.warning("%s", variable.warning())
    address = address or settings.listen
    server, port = bind_server(address, settings)
    host = address.rsplit(":", 1)[0]
    if "safety" in services and "trainer" in services and not settings.endpoints.safety:
        # All in one process: the trainer follows this very server's safety service.
        settings = settings.model_copy(
            update={
                "endpoints": settings.endpoints.model_copy(update={"safety": f"127.0.0.1:{port}"})
            }
        )
    runtime = Runtime.from_settings(settings)
    handles = [_create(name, runtime) for name in services]
    telemetry = start_telemetry(
        settings, _trace_name(services), handles, runtime.queue, address_host(address)
    )
    for handle in handles:
        handle.register(server)
    add_standard_services(server, [handle.grpc_service_name for handle in handles])
    server.start()
    stack = RunningStack(
        server=server,
        port=port,
        host=host,
        handles=handles,
        runtime=runtime,
        telemetry=telemetry,
    )
    if start_workers:
        stack.start_workers()
    log.info("serving %s on %s:%d", ", ".join(services), host, port)
    return stack
