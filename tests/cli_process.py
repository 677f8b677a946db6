"""The installed `backprop` command run as a user runs it: a fresh process in a directory of its
own, with its own BACKPROPAGATE_HOME and none of the developer's BACKPROPAGATE_* variables, so no
`.env` or endpoint of theirs applies."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BACKPROP = Path(sys.executable).parent / "backprop"
TIMEOUT_SECONDS = 120


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    stdout: str
    stderr: str


def user_environment(home: Path, endpoint: str | None = None) -> dict[str, str]:
    """The environment of a user whose state lives in `home`/state; with no `endpoint` the
    commands run the embedded default."""
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("BACKPROPAGATE_")
    }
    environment |= {
        "BACKPROPAGATE_HOME": str(home / "state"),
        "BACKPROPAGATE_SAFETY__SOURCE": "host",
        "COLUMNS": "200",  # rich must not wrap a message in the middle of what we look for
        "NO_COLOR": "1",
    }
    if endpoint is not None:
        environment["BACKPROPAGATE_ENDPOINT"] = endpoint
    return environment


def backprop(
    home: Path,
    *args: str,
    endpoint: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = TIMEOUT_SECONDS,
) -> Outcome:
    """Run `backprop ARGS` in `home` (with `env` added to the environment); with no `endpoint`
    it runs the embedded default."""
    done = subprocess.run(
        [str(BACKPROP), *args],
        cwd=home,
        env=user_environment(home, endpoint) | (env or {}),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Outcome(done.returncode, done.stdout, done.stderr)
