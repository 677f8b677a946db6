"""Fixtures of the container test: the images, built once per session, and the stack."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from compose_stack import Stack, build_images, compose_stack
from engine import engine_name


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> float:
    """The CPU stack's images and the S3 stand-in, built once per session; the seconds it
    took. Skipped, saying why, where no container engine exists."""
    name = engine_name()
    if name is None:
        pytest.skip(
            "no container engine: the compose stack test needs Docker or podman "
            "(.ci/run installs podman)"
        )
    return build_images(name, tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def stack(images: float, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with compose_stack(tmp_path_factory.mktemp("compose")) as running:
        yield running
    healthy = ", ".join(f"{seconds:.0f} s" for seconds in running.seconds_to_healthy)
    print(f"compose stack: images {images:.0f} s, up to healthy {healthy}")
