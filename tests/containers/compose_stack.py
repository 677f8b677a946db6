"""The compose stack the container test drives: its images built as `make images` builds them,
the shipped docker-compose.yml run by the real Compose v2 binary with only `minio` replaced
(compose.s3-standin.yml), and a `backprop` client on the host pointed at its published ports.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import servers
from engine import Engine, compose_binary, engine
from pydantic import SecretStr

from backpropagate import Trainer
from backpropagate_api.settings import EndpointSettings, Settings
from backpropagate_services.stack import SERVICES

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
COMPOSE_FILES = [REPO / "docker-compose.yml", HERE / "compose.s3-standin.yml"]
S3_STANDIN = HERE / "s3_standin"
S3_STANDIN_IMAGE = "backpropagate-test-s3-standin:latest"
# The host port of each service's gRPC API, as .env.example names them.
PORT_VARIABLES = {
    "dataprep": "BACKPROPAGATE_DATAPREP_PORT",
    "trainer": "BACKPROPAGATE_TRAINER_PORT",
    "safety": "BACKPROPAGATE_SAFETY_PORT",
    "export": "BACKPROPAGATE_EXPORT_PORT",
}


def build_images(engine_name: str, work: Path) -> float:
    """Build the CPU stack's images with `make images`' two commands (the llama.cpp wheel from
    the cache `make setup` filled; torch's CPU wheel from pip's find-links where it is one), and
    the S3 stand-in. The seconds it took; the images' sizes are printed."""
    llama_wheels = work / "llama-wheels"
    run_to_end(["bash", "deploy/llama-cpp/build-wheel.sh", sys.executable, str(llama_wheels)])
    command = [sys.executable, "deploy/build_images.py", "--llama-wheels", str(llama_wheels)]
    if wheels := cpu_torch_wheels():
        command += ["--wheels", str(wheels)]
    started = time.monotonic()
    run_to_end(command, env={"CONTAINER_ENGINE": engine_name, "COMPOSE": str(compose_binary())})
    [moto] = [
        line
        for line in (REPO / "requirements-dev.txt").read_text().splitlines()
        if line.startswith("moto[server]==")
    ]
    format_flag = ["--format", "docker"] if engine_name == "podman" else []
    standin = ["--build-arg", f"MOTO={moto}", "-t", S3_STANDIN_IMAGE, str(S3_STANDIN)]
    run_to_end([engine_name, "build", *format_flag, *standin])
    seconds = time.monotonic() - started
    listed = subprocess.run(
        [engine_name, "image", "ls", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}"],
        capture_output=True,
        text=True,
        check=True,
    )
    sizes = [line for line in listed.stdout.splitlines() if "backpropagate-" in line]
    print(f"images built in {seconds:.0f} s: {', '.join(sizes)}")
    return seconds


def run_to_end(command: list[str], env: dict[str, str] | None = None) -> None:
    """Run a build step from the repository root; its output only when it fails."""
    done = subprocess.run(
        command,
        cwd=REPO,
        env={**users_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"


def users_env() -> dict[str, str]:
    """The environment of a user's shell: none of this test session's settings."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("BACKPROPAGATE_", "COMPOSE_", "DOCKER_"))
    }


def cpu_torch_wheels() -> Path | None:
    """The directory of pip's find-links that holds the CPU torch wheel of the pinned version:
    where `make setup` took torch from on a machine that cannot reach the torch index."""
    requirements = (REPO / "services" / "common" / "requirements-model.txt").read_text()
    pin = re.search(r"^torch==(\S+)", requirements, re.MULTILINE)
    assert pin, "requirements-model.txt pins no torch"
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    for directory in re.findall(r"find-links='([^']+)'", listed):
        if list(Path(directory).glob(f"torch-{pin.group(1)}+cpu-*.whl")):
            return Path(directory)
    return None


@dataclass
class Stack:
    """The compose project under test and a `backprop` client on the host pointed at it."""

    engine: Engine
    project: str
    env_file: Path  # what `make env` writes, with free host ports
    client_dir: Path  # where `backprop` runs: its .env is env_file (the token)
    endpoints: dict[str, str]
    seconds_to_healthy: list[float] = field(default_factory=list)
    shared: dict[str, Any] = field(default_factory=dict)  # what one test leaves the next

    def compose(self, *args: str, timeout: float = 900) -> str:
        files = [flag for file in COMPOSE_FILES for flag in ("-f", str(file))]
        project = ["--project-directory", str(REPO), *files, "--env-file", str(self.env_file)]
        done = subprocess.run(
            [str(compose_binary()), *project, "-p", self.project, *args],
            env={**users_env(), **self.engine.env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert done.returncode == 0, f"compose {' '.join(args)}:\n{done.stderr[-4000:]}"
        return done.stdout

    def up(self) -> float:
        """`up --wait`: the seconds until every service is healthy."""
        started = time.monotonic()
        self.compose("up", "--wait", "--wait-timeout", "600")
        self.seconds_to_healthy.append(time.monotonic() - started)
        return self.seconds_to_healthy[-1]

    def services(self) -> dict[str, dict[str, Any]]:
        """`compose ps` by service: the State and Health of each running container."""
        listed = self.compose("ps", "--format", "json")
        rows = [json.loads(line) for line in listed.splitlines() if line.strip()]
        return {row["Service"]: row for row in rows}

    def backprop(self, *args: str, timeout: float = 900) -> str:
        """A `backprop` command on the host as the README runs it: the endpoints exported in
        the shell, the token from the .env in its working directory."""
        endpoints = {f"BACKPROPAGATE_ENDPOINTS__{s.upper()}": a for s, a in self.endpoints.items()}
        done = subprocess.run(
            [str(Path(sys.executable).parent / "backprop"), *args],
            cwd=self.client_dir,
            env={
                **users_env(),
                **endpoints,
                "BACKPROPAGATE_HOME": str(self.client_dir / "home"),
                "COLUMNS": "200",
            },
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert done.returncode == 0, f"backprop {' '.join(args)}:\n{done.stderr[-4000:]}"
        return done.stdout

    def sdk(self) -> Trainer:
        """The Python SDK on the same endpoints and token, for what the CLI does not show."""
        token = env_values(self.env_file)["BACKPROPAGATE_TOKEN"]
        settings = Settings(endpoints=EndpointSettings(**self.endpoints), token=SecretStr(token))
        return Trainer(settings=settings, progress=False)


def env_values(env_file: Path) -> dict[str, str]:
    lines = env_file.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line[:1].isalpha())


@contextmanager
def compose_stack(work: Path) -> Iterator[Stack]:
    """A compose project of its own (name, free host ports, the .env `make env` writes), not
    started yet; at the end `down -v` takes it all away."""
    client_dir = work / "client"
    client_dir.mkdir()
    env_file = client_dir / ".env"
    subprocess.run(
        ["bash", str(REPO / "deploy" / "write-env.sh"), str(env_file), str(REPO / ".env.example")],
        capture_output=True,
        check=True,
    )
    ports = {service: servers.free_port() for service in SERVICES}
    with env_file.open("a") as file:
        for service, port in ports.items():
            file.write(f"{PORT_VARIABLES[service]}={port}\n")
        file.write(f"MINIO_CONSOLE_PORT={servers.free_port()}\n")
    project = f"bptest{os.getpid()}"
    with engine(work, project) as container_engine:
        endpoints = {service: f"{servers.LOOPBACK}:{port}" for service, port in ports.items()}
        stack = Stack(container_engine, project, env_file, client_dir, endpoints)
        try:
            yield stack
        finally:
            stack.compose("down", "-v", "--remove-orphans", "--timeout", "60")
