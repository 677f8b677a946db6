"""Runs one service or all of them in this process: `backprop serve` and the embedded default.

`docker compose` runs one service per container; the embedded default runs all four in the
client's process with the in-process queue and a local artifact directory. Both go through
`start_stack`, so the code under test is the code users run.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import grpc

from backpropagate_services.common.errors import ConfigError
from backpropagate_services.common.grpc_server import add_standard_services, bind_server
from backpropagate_services.common.logs import quiet_library_output
from backpropagate_services.common.runtime import Runtime
from backpropagate_services.common.service import ServiceHandle
from backpropagate_services.common.settings import Settings

log = logging.getLogger(__name__)

SERVICES = ("dataprep", "trainer", "safety", "export")


@dataclass
class RunningStack:
    server: grpc.Server
    port: int
    host: str
    handles: list[ServiceHandle]
    runtime: Runtime

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def wait(self) -> None:
        self.server.wait_for_termination()

    def stop(self, grace: float = 2.0) -> None:
        for handle in self.handles:
            for worker in handle.workers:
                worker.stop()
        self.server.stop(grace).wait()
        self.runtime.close()


def _create(name: str, runtime: Runtime) -> ServiceHandle:
    module = importlib.import_module(f"backpropagate_services.{name}.server")
    handle: ServiceHandle = module.create(runtime)
    return handle


def start_stack(
    settings: Settings, services: list[str], address: str | None = None
) -> RunningStack:
    unknown = sorted(set(services) - set(SERVICES))
    if unknown or not services:
        raise ConfigError(
            f"Unknown service(s) {unknown}; choose from {', '.join(SERVICES)} or 'all'.",
        )
    quiet_library_output()
    address = address or settings.listen
    server, port = bind_server(address)
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
    for handle in handles:
        handle.register(server)
    add_standard_services(server, [handle.grpc_service_name for handle in handles])
    server.start()
    for handle in handles:
        for worker in handle.workers:
            worker.start()
    log.info("serving %s on %s:%d", ", ".join(services), host, port)
    return RunningStack(server=server, port=port, host=host, handles=handles, runtime=runtime)
