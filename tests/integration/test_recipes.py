"""Every block of docs/recipes.md runs as a reader would paste it, so no recipe rots.

The blocks run in order (a later one may use what an earlier one made, as on the page) in one
fresh directory holding a copy of examples/, against the embedded default with a home of their
own and the real offline model; each bash block under `bash -euo pipefail`, each Python block in
a fresh interpreter, with the venv's `backprop` and `python3` first on PATH.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_process import user_environment

pytestmark = [pytest.mark.model, pytest.mark.llama]

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "docs" / "recipes.md"
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.M | re.S)


def blocks() -> list[tuple[str, str]]:
    return BLOCK.findall(RECIPES.read_text())


def test_the_recipes_page_has_shell_and_python_blocks() -> None:
    languages = [language for language, _ in blocks()]

    assert languages.count("bash") >= 3 and languages.count("python") >= 3


def test_every_recipe_runs_as_written(tmp_path: Path, model_cache: Path) -> None:
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    env = user_environment(tmp_path) | {
        "BACKPROPAGATE_MODEL_CACHE": str(model_cache),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    for number, (language, code) in enumerate(blocks(), start=1):
        command = ["bash", "-euo", "pipefail", "-c", code]
        if language == "python":
            command = [sys.executable, "-c", code]
        done = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )

        assert done.returncode == 0, (
            f"recipe block {number} ({language}) failed:\n{code}\n"
            f"stdout:\n{done.stdout[-2000:]}\nstderr:\n{done.stderr[-3000:]}"
        )
