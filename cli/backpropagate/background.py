"""A detached worker process for the embedded default: `backprop train --detach` without a
stack still trains after the terminal is closed.

It is `backprop serve all` on a free loopback port, in its own session (no terminal's hangup
reaches it), sharing the home directory's queue and store with every other `backprop` process;
it exits once it has had no job for a while.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

IDLE_EXIT_SECONDS = 30


def start_background_worker(home: Path) -> Path:
    """Start the worker; returns its log file."""
    log = home / "logs" / f"worker-{time.strftime('%Y%m%d-%H%M%S')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "backpropagate.cli", "serve", "all"]
    argv += ["--listen", "127.0.0.1:0", "--until-idle", str(IDLE_EXIT_SECONDS)]
    with log.open("ab") as output:
        subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return log
