"""Between two training steps: continue, pause, resume or stop, as the safety sidecar's level says.

The gate only decides; the caller acts. Feed it each level the sidecar reports (and the
snapshot's reasons) before a step, and while paused after each new snapshot:

- CRITICAL: PAUSE. The caller checkpoints, then waits for the next snapshot and asks again;
  the gate answers WAIT until it is time to RESUME.
- A pause ends only once the level has stayed at WARNING or below for `resume_after_seconds`:
  a GPU hovering at its critical temperature would otherwise pause and resume every few steps.
- EMERGENCY: STOP, paused or not. The caller checkpoints and ends the run with
  `decision.error`, so it can be resumed later.
- A configured sidecar that does not answer (level UNSPECIFIED) must not stop training: the
  gate says DEGRADED once per outage (the caller warns) and CONTINUE after. A paused run stays
  paused through an outage: it resumes only on evidence that the machine is back in range.
- No sidecar configured: always CONTINUE.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from backpropagate_api.errors import (
    GpuOutOfMemoryError,
    GpuTemperatureCriticalError,
    HostMemoryCriticalError,
    RuntimeFailure,
)
from backpropagate_api.v1 import common_pb2

UNSPECIFIED = common_pb2.SAFETY_LEVEL_UNSPECIFIED
WARNING = common_pb2.SAFETY_LEVEL_WARNING
CRITICAL = common_pb2.SAFETY_LEVEL_CRITICAL
EMERGENCY = common_pb2.SAFETY_LEVEL_EMERGENCY


class Action(Enum):
    CONTINUE = "continue"  # take the next step
    PAUSE = "pause"  # checkpoint, then wait for the next snapshot and ask again
    WAIT = "wait"  # still paused: wait for the next snapshot and ask again
    RESUME = "resume"  # the pause is over: take the next step
    STOP = "stop"  # checkpoint, then raise `Decision.error`
    DEGRADED = "degraded"  # the sidecar stopped answering: warn, then take the next step


@dataclass(frozen=True)
class Decision:
    action: Action
    message: str = ""  # one line for the run's events and the log
    error: RuntimeFailure | None = None  # STOP only: what the run ends with


def level_name(level: int) -> str:
    return common_pb2.SafetyLevel.Name(level).removeprefix("SAFETY_LEVEL_").lower()


def stop_error(reasons: Sequence[str]) -> RuntimeFailure:
    """The error of a safety stop, named after the first reason: the sidecar lists them worst
    first ("GPU 0 at 96 C (emergency at 95 C)", "host memory 99% (...)", "GPU 0 VRAM 99% (...)").
    """
    message = f"Stopped for safety: {'; '.join(reasons) or 'emergency level'}."
    cause = reasons[0] if reasons else ""
    if cause.startswith("host memory"):
        return HostMemoryCriticalError(message)
    if cause.startswith("GPU") and "VRAM" in cause:
        return GpuOutOfMemoryError(
            message,
            hint="GPU memory is all but full, so the run was checkpointed and stopped. Free the "
            "GPU of other processes, then `backprop runs resume RUN` (docs/safety.md).",
        )
    if cause.startswith("GPU"):
        return GpuTemperatureCriticalError(message)
    return RuntimeFailure(
        message,
        hint="The safety sidecar reported an emergency, so the run was checkpointed and "
        "stopped: `backprop runs resume RUN` once the machine is back in range.",
    )


class SafetyGate:
    """The pause state of one run; `clock` (seconds, monotonic) is injectable for tests."""

    def __init__(
        self,
        resume_after_seconds: float,
        *,
        configured: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.resume_after_seconds = resume_after_seconds
        self.configured = configured
        self.clock = clock
        self.paused = False
        self._calm_since: float | None = None  # while paused: first of the calm readings
        self._away = False  # the sidecar's current outage was already reported

    def decide(self, level: int, reasons: Sequence[str] = ()) -> Decision:
        """What to do given the latest level and its snapshot's reasons."""
        why = "; ".join(reasons) or level_name(level)
        if level == UNSPECIFIED:
            return self._sidecar_away()
        self._away = False
        if level >= EMERGENCY:
            self.paused = False
            return Decision(Action.STOP, f"stopping: {why}", stop_error(reasons))
        if level >= CRITICAL:
            self._calm_since = None
            if self.paused:
                return Decision(Action.WAIT, f"paused: {why}")
            self.paused = True
            return Decision(
                Action.PAUSE,
                f"pausing: {why}; resuming after {self.resume_after_seconds:g} s at warning "
                "or below",
            )
        if not self.paused:
            return Decision(Action.CONTINUE)
        now = self.clock()
        if self._calm_since is None:
            self._calm_since = now
        calm_for = now - self._calm_since
        if calm_for < self.resume_after_seconds:
            return Decision(Action.WAIT, f"paused: {level_name(level)} for {calm_for:.0f} s")
        self.paused = False
        self._calm_since = None
        return Decision(Action.RESUME, f"resuming: {level_name(level)} for {calm_for:.0f} s")

    def _sidecar_away(self) -> Decision:
        if not self.configured:
            return Decision(Action.CONTINUE)
        first = not self._away
        self._away = True
        if self.paused:
            self._calm_since = None  # an unknown level is not a calm one
            return Decision(Action.WAIT, "paused: the safety sidecar is unreachable")
        if first:
            return Decision(
                Action.DEGRADED,
                "the safety sidecar is unreachable: training on without safety levels",
            )
        return Decision(Action.CONTINUE)
