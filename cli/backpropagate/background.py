"""A detached worker process for the embedded default: `backprop train --detach` without a
stack still trains after the terminal is closed.

It is the embedded stack in a process of its own: the settings of the process that started it
(handed over on its stdin, so a `Trainer(settings=...)` home and its secrets reach it and
nobody else), the home directory's queue and store that every `backprop` process shares, and
like any embedded stack a random token of its own, so no other user of the machine can call it.
It runs in its own session (no terminal's hangup reaches it) and exits once it has had no job
for a while.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from backpropagate.connection import embedded_stack
from backpropagate_api.private_files import (
    private_directory,
    private_home,
    private_opener,
)
from backpropagate_api.settings import Settings

IDLE_EXIT_SECONDS = 30


@dataclass(frozen=True)
class DetachedWorker:
    process: subprocess.Popen[bytes]
    log: Path  # its output: where it serves, and anything that went wrong before logging began


def start_background_worker(
    settings: Settings, idle_exit_seconds: float = IDLE_EXIT_SECONDS
) -> DetachedWorker:
    """Start a worker on `settings` (their home); it exits after `idle_exit_seconds` without a
    job."""
    logs = private_directory(private_home(settings.home) / "logs")
    log = logs / f"worker-{time.strftime('%Y%m%d-%H%M%S')}.log"
    # Not `-m backpropagate.background`: the package imports this module first, which runpy
    # warns about in the worker's log.
    entry = "from backpropagate.background import main; main()"
    argv = [sys.executable, "-c", entry, str(idle_exit_seconds)]
    with open(log, "ab", opener=private_opener) as output:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    assert process.stdin is not None
    with process.stdin as settings_pipe:  # a pipe: the settings' secrets touch no disk
        settings_pipe.write(pickle.dumps(settings))
    return DetachedWorker(process, log)


def main() -> None:
    """The worker's process: serve until idle; SIGTERM checkpoints a run in progress, which
    `backprop runs resume` then goes on with."""
    # Everything it writes (the store, the queue, logs, the model cache) is its user's only.
    os.umask(0o077)
    settings: Settings = pickle.load(sys.stdin.buffer)
    idle_exit_seconds = float(sys.argv[1])
    stack = embedded_stack(settings)  # stopped by the exit hook it registers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"serving {settings.home} on {stack.address} (pid {os.getpid()})", flush=True)
    stack.wait_until_idle(idle_exit_seconds)
