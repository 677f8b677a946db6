"""A rebuild (`make images` again after a change) removes the image it replaced: the tag moves
to the new one and the old one, untagged and unused, would otherwise keep its GBs on the disk
of every machine that builds again and again. A tiny image on the stack's base stands in for
the services' own, which `images` has already built once."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from deploy_script import REPO, build_images_module
from engine import engine_name

pytestmark = pytest.mark.containers

NAME = "backpropagate-rebuild-test"


def test_a_rebuild_removes_the_image_it_replaced(images: float, tmp_path: Path) -> None:
    build_images = build_images_module()
    engine = engine_name()
    assert engine
    dockerfile = tmp_path / "Dockerfile"
    dataprep = build_images.Image(NAME, REPO, REPO / "deploy" / "dataprep" / "Dockerfile", {})
    base = build_images.qualified(dataprep.base())  # the base every service image builds on
    dockerfile.write_text(f"FROM {base}\nCOPY version /version\n")
    image = build_images.Image(NAME, tmp_path, dockerfile, {})
    try:
        built = []
        for version in ("first", "second"):  # a changed file, as a change to the code is
            (tmp_path / "version").write_text(version)
            build_images.build(engine, image, {}, {})
            built.append(build_images.image_id(engine, NAME))

        first, second = built
        assert first and second and first != second
        assert build_images.image_id(engine, first) is None, "the replaced image is still there"
    finally:
        subprocess.run([engine, "image", "rm", "--force", NAME], capture_output=True)
