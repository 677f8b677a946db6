"""TrainingCallback: your functions, called as a run the SDK follows goes on.

    from backpropagate import Trainer, TrainingCallback

    callback = TrainingCallback(
        on_step=lambda step, loss: print(f"step {step}: loss {loss:.4f}"),
        on_complete=lambda run: print(f"done, final loss {run.final_loss:.4f}"),
        on_error=lambda err: print(f"failed: {err}"),
    )
    Trainer().train("data.jsonl", steps=100, callback=callback)

The hooks are fed by the run's events, in the calling thread, while `train()`, `watch()`,
`resume()` or `replay()` follows the run; a run trains on a worker, so nothing is called for a
run nobody follows. Following starts at the run's first event: `watch()` of a run that is under
way calls `on_step` for the steps already done too, and a run resumed from a checkpoint reports
the steps after that checkpoint again.

A hook that raises never stops the run, nor following it: the error is logged (with its
traceback the first time each hook raises, counted after that) and the SDK goes on as if the
hook had returned, so `train()` returns the run's result, or raises its error, as it would have
without the callback. To stop a run from a hook, cancel it (`backprop runs cancel RUN_ID`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from backpropagate.results import RunResult
from backpropagate.workflows import RunEventHandler
from backpropagate_api.layout import checkpoint_prefix
from backpropagate_api.v1 import trainer_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingCallback:
    """Functions called as a followed run goes on; each is optional."""

    on_step: Callable[[int, float], Any] | None = None
    """(step, loss) after each optimizer step."""
    on_epoch: Callable[[int], Any] | None = None
    """(epochs completed) after each pass over the training data."""
    on_save: Callable[[str], Any] | None = None
    """(store key of the checkpoint) after each checkpoint is written, e.g.
    runs/<run_id>/checkpoints/step-00000100-attempt-001 (with the local store, a directory
    under <home>/artifacts)."""
    on_complete: Callable[[RunResult], Any] | None = None
    """(the run's result) once it has succeeded."""
    on_error: Callable[[Exception], Any] | None = None
    """(the error about to be raised) once the run has failed, been cancelled or interrupted."""


class _Calls:
    """One followed run's calls into a callback: events in, hooks called, failures logged."""

    def __init__(self, callback: TrainingCallback, then: RunEventHandler | None) -> None:
        self.callback = callback
        self.then = then  # the progress bar, say: fed every event first
        self.failures: Counter[str] = Counter()

    def __call__(self, event: trainer_pb2.RunEvent) -> None:
        if self.then is not None:
            self.then(event)
        if event.kind == "step":
            self.call("on_step", event.step, event.loss)
        elif event.kind == "epoch":
            self.call("on_epoch", event.epoch)
        elif event.kind == "checkpoint":
            self.call("on_save", checkpoint_prefix(event.run_id, event.step, event.attempt))

    def call(self, hook: str, *args: Any) -> None:
        function = getattr(self.callback, hook)
        if function is None:
            return
        try:
            function(*args)
        except Exception:
            self.failures[hook] += 1
            if self.failures[hook] == 1:
                log.exception(
                    "TrainingCallback.%s raised; the run and following it go on (further "
                    "errors of this hook are counted, not logged)",
                    hook,
                )

    def summarise(self) -> None:
        for hook, count in self.failures.items():
            if count > 1:
                log.warning("TrainingCallback.%s raised %d times in all", hook, count)


def follow_calling(
    callback: TrainingCallback | None,
    on_event: RunEventHandler | None,
    follow: Callable[[RunEventHandler | None], RunResult],
) -> RunResult:
    """`follow(handler)` follows a run, passing every event to `handler`; with a callback, its
    hooks are called as well: per event, then on_complete with the result or on_error with the
    error `follow` raises (raised on afterwards)."""
    if callback is None:
        return follow(on_event)
    calls = _Calls(callback, on_event)
    try:
        result = follow(calls)
    except Exception as error:
        calls.call("on_error", error)
        calls.summarise()
        raise
    calls.call("on_complete", result)
    calls.summarise()
    return result
