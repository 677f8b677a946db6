"""The web UI as users start it: `backprop ui` in a process of its own on a free loopback port
(a headless Chromium looks at it: ui_browser)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import servers

REPO = Path(__file__).resolve().parents[2]
# Every page's screenshot goes here (build/ is not committed); the Train page's also to the
# README's image.
SCREENSHOTS = REPO / "build" / "ui-screenshots"
README_IMAGE = REPO / "docs" / "images" / "ui-train.png"


def backprop() -> str:
    return str(Path(sys.executable).parent / "backprop")


def ui_env(home: Path, **settings: str) -> dict[str, str]:
    """The environment of a `backprop ui` on its own home; no UI setting inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKPROPAGATE_UI__")}
    env.pop("BACKPROPAGATE_SECURITY__REQUIRE_AUTH_FOR_SHARE", None)
    return {**env, "BACKPROPAGATE_HOME": str(home), **settings}


@dataclass(frozen=True)
class UiServer:
    url: str
    port: int
    log: Path  # what the process printed
    home: Path

    @property
    def output_dir(self) -> Path:
        return self.home / "ui-outputs"


@contextmanager
def ui_process(home: Path, *args: str, **settings: str) -> Iterator[UiServer]:
    """`backprop ui --port P ARGS` with `settings` (BACKPROPAGATE_... variables) until the block
    ends; stopped with SIGTERM, as a service manager would."""
    port = servers.free_port()
    url = f"http://{servers.LOOPBACK}:{port}/"
    log = home / "ui-process.log"
    home.mkdir(parents=True, exist_ok=True)
    with servers.running(
        [backprop(), "ui", "--port", str(port), *args],
        ready=lambda: servers.http_answers(url),
        what="backprop ui",
        timeout=180,
        env=ui_env(home, **settings),
        log_path=log,
    ):
        yield UiServer(url, port, log, home)
