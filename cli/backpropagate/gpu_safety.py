"""The safety sidecar's verdict from Python: `check_gpu_safe()` once, `GPUMonitor` as it goes.

    from backpropagate.gpu_safety import GPUMonitor, check_gpu_safe
    if not check_gpu_safe():
        print(check_gpu_safe().reasons)
    with GPUMonitor(on_status=print, interval_seconds=5) as monitor:
        ...  # a long job of your own; monitor.status is the latest reading

Runs need neither: the trainer follows the sidecar itself, pausing at critical and stopping at
emergency (docs/safety.md). These are for scripts that want the same readings and levels:
NVML's GPU temperature and memory on a GPU machine, host memory elsewhere. With the embedded
default they are read on this machine without starting the stack; with an endpoint they come
from the stack's sidecar.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from backpropagate.connection import Connection
from backpropagate.progress import safety_name
from backpropagate_api.settings import Settings
from backpropagate_api.v1 import common_pb2, safety_pb2

# At these levels the trainer pauses (critical) or stops (emergency): not safe to train.
UNSAFE_LEVELS = (common_pb2.SAFETY_LEVEL_CRITICAL, common_pb2.SAFETY_LEVEL_EMERGENCY)


@dataclass(frozen=True)
class GpuSafetyStatus:
    """One reading: truthy when it is safe to train (below critical)."""

    level: str  # safe, warm, warning, critical or emergency
    source: str  # nvml, host, or replay (a drill)
    reasons: list[str] = field(default_factory=list)  # why the level is above safe
    snapshot: safety_pb2.SafetySnapshot = field(default_factory=safety_pb2.SafetySnapshot)

    @property
    def safe(self) -> bool:
        return self.snapshot.level not in UNSAFE_LEVELS

    def __bool__(self) -> bool:
        return self.safe

    @classmethod
    def from_proto(cls, snapshot: safety_pb2.SafetySnapshot) -> GpuSafetyStatus:
        return cls(safety_name(snapshot.level), snapshot.source, list(snapshot.reasons), snapshot)


def _read(connection: Connection) -> GpuSafetyStatus:
    snapshot = connection.call("safety", connection.safety.Snapshot, safety_pb2.SnapshotRequest())
    return GpuSafetyStatus.from_proto(snapshot)


def check_gpu_safe(settings: Settings | None = None) -> GpuSafetyStatus:
    """One reading of the sidecar: truthy below critical, with the level and its reasons."""
    connection = Connection.for_reading(settings)
    try:
        return _read(connection)
    finally:
        connection.close()


class GPUMonitor:
    """Reads the sidecar every `interval_seconds` in a thread until stopped; `on_status` is
    called with each reading, `on_unsafe` with each one at critical or above."""

    def __init__(
        self,
        interval_seconds: float = 5.0,
        *,
        on_status: Callable[[GpuSafetyStatus], object] | None = None,
        on_unsafe: Callable[[GpuSafetyStatus], object] | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.interval_seconds = interval_seconds
        self.on_status, self.on_unsafe = on_status, on_unsafe
        self.settings = settings
        self.status: GpuSafetyStatus | None = None  # the latest reading
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Take the first reading now (an unreachable sidecar fails here), then go on in a
        thread."""
        connection = Connection.for_reading(self.settings)
        self._take(connection)
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(connection,), name="gpu-monitor", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _take(self, connection: Connection) -> None:
        self.status = _read(connection)
        if self.on_status is not None:
            self.on_status(self.status)
        if not self.status and self.on_unsafe is not None:
            self.on_unsafe(self.status)

    def _run(self, connection: Connection) -> None:
        try:
            while not self._stop.wait(self.interval_seconds):
                self._take(connection)
        finally:
            connection.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
