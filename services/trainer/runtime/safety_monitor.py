"""Follows the safety sidecar's Watch stream: the level a trainer obeys between two steps.

The trainer must keep training if the sidecar restarts: the stream is re-opened with capped
exponential backoff (a sidecar down for an hour is asked every 30 s, not hammered), and while it
is away the level reads UNSPECIFIED, never a stale "safe". A paused trainer blocks in
`wait_for_update`, so it wakes as soon as a snapshot arrives (or the sidecar is lost) instead of
polling.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import grpc
from tenacity import Retrying, retry_if_result, wait_exponential

from backpropagate_api.channels import STACK_CALL, open_channel
from backpropagate_api.settings import Settings
from backpropagate_api.v1 import common_pb2, safety_pb2, safety_pb2_grpc
from backpropagate_services.common.service import BackgroundWorker

log = logging.getLogger(__name__)

RECONNECT_FIRST_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 30.0


class SafetyMonitor(BackgroundWorker):
    """The latest snapshot's level and reasons, safe to read from any thread."""

    name = "safety-monitor"

    def __init__(
        self,
        endpoint: str | None,
        interval_seconds: float = 2.0,
        dial: Callable[[str], grpc.Channel] = grpc.insecure_channel,
    ) -> None:
        """`dial`: opens the channel to `endpoint` (with the stack's token and TLS: see
        `channels.open_channel`)."""
        super().__init__()
        self.endpoint = endpoint
        self.dial = dial
        self.interval_seconds = interval_seconds
        self._changed = threading.Condition()  # guards every field below
        self._level: int = common_pb2.SAFETY_LEVEL_UNSPECIFIED
        self._reasons: tuple[str, ...] = ()
        self._connected = False
        self._updates = 0
        self._call: grpc.Future | None = None

    @classmethod
    def for_settings(cls, settings: Settings) -> SafetyMonitor:
        """Following the sidecar the settings name, with the stack's token and TLS."""
        return cls(
            settings.endpoint_of("safety"),
            settings.safety.interval_seconds,
            dial=lambda target: open_channel(target, settings),
        )

    @property
    def configured(self) -> bool:
        """Whether a sidecar endpoint is set; without one the level stays UNSPECIFIED."""
        return bool(self.endpoint)

    @property
    def level(self) -> int:
        """A common_pb2.SafetyLevel; UNSPECIFIED while the sidecar is away."""
        with self._changed:
            return self._level

    @property
    def reasons(self) -> tuple[str, ...]:
        """Why the latest level is above safe, worst first; empty while the sidecar is away."""
        with self._changed:
            return self._reasons

    @property
    def connected(self) -> bool:
        """Whether the stream is delivering snapshots."""
        with self._changed:
            return self._connected

    def wait_for_update(self, timeout: float) -> None:
        """Block until the next snapshot arrives or the sidecar is lost, at most `timeout` s."""
        with self._changed:
            seen = self._updates
            self._changed.wait_for(lambda: self._updates != seen, timeout)

    def start(self) -> None:
        if not self.configured:
            log.warning("no safety endpoint configured: training runs without safety levels")
            return
        super().start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._changed:
            call = self._call
        if call is not None:
            call.cancel()  # unblocks the stream the worker thread is reading
        super().stop(timeout)

    def run_once(self) -> None:
        """Follow the stream; while the sidecar does not answer, retry with capped backoff.

        A fresh backoff for each stream that delivered: after a sidecar restart the first
        reconnection comes at once.
        """
        Retrying(
            retry=retry_if_result(lambda delivered: not delivered and not self.stopping),
            wait=wait_exponential(multiplier=RECONNECT_FIRST_SECONDS, max=RECONNECT_MAX_SECONDS),
            sleep=self._stop.wait,  # stop() cuts a wait short
        )(self._follow)

    def _follow(self) -> bool:
        """Read one Watch stream until it ends; whether it delivered any snapshot."""
        if self.stopping:
            return False
        assert self.endpoint is not None
        delivered = False
        with self.dial(self.endpoint) as channel:
            # Marked as the stack's own: the sidecar keeps a slot for it that callers cannot
            # fill (grpc_guards.CallLimits).
            call = safety_pb2_grpc.SafetyServiceStub(channel).Watch(
                safety_pb2.WatchSafetyRequest(interval_seconds=self.interval_seconds),
                metadata=[STACK_CALL],
            )
            with self._changed:
                self._call = call
            if self.stopping:  # stop() may have looked for the call before it was set
                call.cancel()
            try:
                for snapshot in call:  # type: ignore[attr-defined]
                    if not delivered:
                        self._log_connected(snapshot.source)
                        delivered = True
                    self._publish(snapshot.level, tuple(snapshot.reasons), connected=True)
            except grpc.RpcError as exc:
                if not self.stopping:
                    log.log(
                        logging.WARNING if delivered else logging.DEBUG,
                        "safety sidecar at %s unreachable (%s); levels are unknown until it "
                        "answers again",
                        self.endpoint,
                        exc.code(),
                    )
        self._publish(common_pb2.SAFETY_LEVEL_UNSPECIFIED, (), connected=False)
        return delivered

    def _log_connected(self, source: str) -> None:
        if source == "replay":
            log.warning(
                "safety levels from %s are a REPLAY (a drill), not this machine's readings",
                self.endpoint,
            )
        else:
            log.info("following the safety sidecar at %s (%s readings)", self.endpoint, source)

    def _publish(self, level: int, reasons: tuple[str, ...], *, connected: bool) -> None:
        with self._changed:
            self._level = level
            self._reasons = reasons
            self._connected = connected
            self._updates += 1
            self._changed.notify_all()
