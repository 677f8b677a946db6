"""Native code in a child process, so that a crash fails one call instead of the service.

llama.cpp is C++ reached through ctypes: a bad kernel (the AMX segfault in docs/export.md), a
corrupt file or an out-of-bounds read kills the process outright, with no Python exception to
catch. Each such stage therefore runs in a fresh interpreter, `python -m` this module: no copy
of the parent's gRPC threads, locks or torch state (as fork would make), and, unlike
multiprocessing's spawn, no re-import of the parent's `__main__`, which in a user's
three-line script without a main guard would start their training again. A child killed by a
signal becomes NativeCrashError naming the signal; an error the child raised is raised again,
as itself.

The job (the parent's sys.path, the stage, a module-level function and its arguments) goes to
the child's stdin as pickles; the outcome comes back on the child's original stdout, which the
child first moves aside so that native code printing to fd 1 cannot corrupt it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, ParamSpec, TypeVar

from backpropagate_api.errors import (
    BackpropagateError,
    JobCancelledError,
    NativeCrashError,
)

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# How often a waiting parent asks whether the job was cancelled.
_POLL_SECONDS = 0.5
_should_stop: ContextVar[Callable[[], bool] | None] = ContextVar("should_stop", default=None)


@contextmanager
def cancellable(should_stop: Callable[[], bool]) -> Iterator[None]:
    """Within this block, a child still running when `should_stop()` turns true is killed and
    its call raises JobCancelledError: a cancelled export does not wait out a quantisation."""
    token = _should_stop.set(should_stop)
    try:
        yield
    finally:
        _should_stop.reset(token)


def _crash_natively() -> None:
    """A real segmentation fault in native code (strlen of a NULL pointer), for drills."""
    ctypes.string_at(0)


def _death_message(returncode: int) -> tuple[str, str]:
    """(the signal or exit code as a word, the phrase for the error message)."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return name, f"was killed by {name}"
    return f"exit code {returncode}", f"exited with code {returncode} before returning a result"


def run_isolated(stage: str, target: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`target(*args, **kwargs)` in a child process; its result, or its error raised here.

    `target` must be a module-level function of an importable module, and its arguments and
    result picklable. `stage` names the work in errors and logs, and is what the native-crash
    drill setting matches.
    """
    job: bytes | None = pickle.dumps(sys.path) + pickle.dumps((stage, target, args, kwargs))
    should_stop = _should_stop.get()
    child = subprocess.Popen(
        [sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    while True:
        try:
            output, _ = child.communicate(job, timeout=_POLL_SECONDS)
            break
        except subprocess.TimeoutExpired:
            job = None  # communicate() goes on sending what it started; output is kept
            if should_stop is not None and should_stop():
                child.kill()
                child.communicate()
                raise JobCancelledError(f"Cancelled during the {stage} stage.") from None
    if child.returncode != 0 or not output:
        cause, phrase = _death_message(child.returncode)
        log.error("the %s child process %s", stage, phrase)
        raise NativeCrashError(
            f"The {stage} stage crashed in native code: its process {phrase}.",
            stage=stage,
            signal=cause,
        )
    kind, value = pickle.loads(output)
    if kind == "ok":
        return value  # type: ignore[no-any-return]
    if kind == "error":
        raise value
    log.error("the %s child process failed unexpectedly: %s", stage, value)
    raise BackpropagateError(f"The {stage} stage failed: {value.splitlines()[0]}", stage=stage)


def _child_main() -> None:
    # The outcome's channel is the original stdout; everything else printed to fd 1 from now on,
    # by Python or by native code, goes to stderr with the rest of the child's diagnostics.
    results = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.path[:] = pickle.load(sys.stdin.buffer)
    from backpropagate_api.settings import get_settings

    outcome: tuple[str, Any]
    try:
        stage, target, args, kwargs = pickle.load(sys.stdin.buffer)
        if get_settings().fault.native_crash_stage == stage:
            _crash_natively()
        outcome = ("ok", target(*args, **kwargs))
    except BackpropagateError as exc:
        outcome = ("error", exc)
    except BaseException as exc:  # reported to the parent, which logs it as a bug
        outcome = ("bug", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    try:
        message = pickle.dumps(outcome)
    except Exception as exc:  # an unpicklable result or error is a bug, not a crash
        message = pickle.dumps(("bug", f"the {outcome[0]} outcome cannot be pickled: {exc}"))
    results.write(message)
    results.close()


if __name__ == "__main__":
    _child_main()
