"""How a service plugs into a server process: its servicer plus its background workers.

Each service package exposes `create(runtime) -> ServiceHandle`; `backpropagate_services.stack`
puts one or all of them in a gRPC server. The embedded default and `docker compose` run the same
handles, so there is one code path for both deployments.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

log = logging.getLogger(__name__)


class BackgroundWorker(ABC):
    """A daemon thread that calls `run_once` until stopped; one failure never kills the loop."""

    name = "worker"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @abstractmethod
    def run_once(self) -> None:
        """Do one unit of work, or wait briefly (e.g. a blocking claim with a timeout)."""

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("%s: iteration failed; continuing", self.name)
                self._stop.wait(1.0)


@dataclass
class ServiceHandle:
    name: str  # dataprep | trainer | safety | export
    grpc_service_name: str  # full proto name, for health checks and reflection
    register: Callable[[grpc.Server], None]
    workers: list[BackgroundWorker] = field(default_factory=list)
