"""Follows the safety sidecar's Watch stream so every training event carries the current level.

The trainer must keep training if the sidecar restarts, so the stream is re-opened after a pause
and the level reads UNSPECIFIED while the sidecar is away, never a stale "safe".
"""

from __future__ import annotations

import logging

import grpc

from backpropagate.v1 import common_pb2, safety_pb2, safety_pb2_grpc
from backpropagate_services.common.service import BackgroundWorker

log = logging.getLogger(__name__)

RECONNECT_SECONDS = 2.0


class SafetyMonitor(BackgroundWorker):
    name = "safety-monitor"

    def __init__(self, endpoint: str | None, interval_seconds: float = 2.0) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.interval_seconds = interval_seconds
        self.level: int = common_pb2.SAFETY_LEVEL_UNSPECIFIED
        self._call: grpc.Future | None = None

    def start(self) -> None:
        if not self.endpoint:
            log.warning("no safety endpoint configured; events carry no safety level")
            return
        super().start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()  # unblocks the stream the worker thread is reading
        super().stop(timeout)

    def run_once(self) -> None:
        assert self.endpoint is not None
        with grpc.insecure_channel(self.endpoint) as channel:
            stub = safety_pb2_grpc.SafetyServiceStub(channel)
            self._call = stub.Watch(
                safety_pb2.WatchSafetyRequest(interval_seconds=self.interval_seconds)
            )
            try:
                for snapshot in self._call:  # type: ignore[attr-defined]
                    self.level = snapshot.level
            except grpc.RpcError as exc:
                if not self.stopping:
                    log.info("safety stream from %s interrupted: %s", self.endpoint, exc.code())
        self.level = common_pb2.SAFETY_LEVEL_UNSPECIFIED
        self._stop.wait(RECONNECT_SECONDS)
