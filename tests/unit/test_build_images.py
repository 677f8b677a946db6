"""deploy/build_images.py (`make images`) without an engine: which images it builds, from what,
and what it refuses. tests/containers builds them for real."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from deploy_script import build_images_module
from test_deploy_static import REQUIRED_SECRETS, compose_binary

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def build_images(monkeypatch_module: pytest.MonkeyPatch) -> ModuleType:
    module = build_images_module()
    # Compose as a clean shell would run it: no .env in the way, no stray settings.
    for name in REQUIRED_SECRETS:
        monkeypatch_module.delenv(name, raising=False)
    monkeypatch_module.setenv("COMPOSE", str(compose_binary()))
    monkeypatch_module.delenv("BACKPROPAGATE_IMAGE_TAG", raising=False)
    return module


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def images(build_images: ModuleType, profile: str) -> dict[str, tuple[str, dict[str, str]]]:
    services = build_images.compose_services(build_images.compose_command(), profile)
    return {
        image.name: (image.dockerfile.relative_to(REPO).as_posix(), image.args)
        for image in build_images.images_to_build(services, [])
    }


def test_the_cpu_images_are_the_four_services_as_compose_names_them(
    build_images: ModuleType,
) -> None:
    assert images(build_images, "cpu") == {
        f"backpropagate-{service}:latest": (f"deploy/{service}/Dockerfile", {})
        for service in ("dataprep", "export", "safety", "trainer")
    }


def test_the_gpu_images_build_torchs_cuda_build_and_share_the_safety_image(
    build_images: ModuleType,
) -> None:
    cuda = {"TORCH_INDEX_URL": "https://pypi.org/simple"}
    assert images(build_images, "gpu") == {
        "backpropagate-dataprep:latest": ("deploy/dataprep/Dockerfile", {}),
        "backpropagate-export-gpu:latest": ("deploy/export/Dockerfile", cuda),
        "backpropagate-safety:latest": ("deploy/safety/Dockerfile", {}),
        "backpropagate-trainer-gpu:latest": (
            "deploy/trainer/Dockerfile",
            {**cuda, "GPU_REQUIREMENTS": "services/trainer/requirements-gpu.txt"},
        ),
    }


def test_only_the_dockerfiles_with_a_stage_of_that_name_get_its_build_context(
    build_images: ModuleType,
) -> None:
    services = build_images.compose_services(build_images.compose_command(), "cpu")
    built = {image.name: image for image in build_images.images_to_build(services, [])}
    with_stage = {
        stage: sorted(name for name, image in built.items() if image.has_stage(stage))
        for stage in ("wheels", "llama-wheels")
    }
    assert with_stage == {
        "wheels": ["backpropagate-export:latest", "backpropagate-trainer:latest"],
        "llama-wheels": ["backpropagate-export:latest"],
    }
    assert {image.base() for image in built.values()} == {"python:3.11-slim"}


def test_a_wheel_directory_without_the_cpu_torch_wheel_is_refused(
    build_images: ModuleType, tmp_path: Path
) -> None:
    """Torch would then come from PyPI, whose Linux build is the multi-GB CUDA one."""
    (tmp_path / "torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl").touch()
    with pytest.raises(SystemExit, match=r"no torch-[\d.]+\+cpu wheel"):
        build_images.torch_wheel_check(tmp_path)


def test_an_unknown_service_is_refused_with_the_ones_there_are(build_images: ModuleType) -> None:
    services = build_images.compose_services(build_images.compose_command(), "cpu")
    with pytest.raises(SystemExit, match="no such service here: trainer-gpu"):
        build_images.images_to_build(services, ["trainer-gpu"])


@pytest.mark.parametrize(
    ("short", "qualified"),
    [
        ("python:3.11-slim", "docker.io/library/python:3.11-slim"),
        ("ollama/ollama:0.35.1", "docker.io/ollama/ollama:0.35.1"),
        ("ghcr.io/coollabsio/minio:x", "ghcr.io/coollabsio/minio:x"),
        ("localhost:5000/redis:7", "localhost:5000/redis:7"),
    ],
)
def test_short_image_names_are_pulled_by_docker_hubs_full_name(
    build_images: ModuleType, short: str, qualified: str
) -> None:
    assert build_images.qualified(short) == qualified
