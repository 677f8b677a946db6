"""What the GPU check needs on a machine where nothing of ours is installed: the wheels that
travel with it (`make gpu-wheels` writes them), and our three packages importable from the
checkout without an install.

A GPU machine lent for a check has PyTorch, CUDA and some of our dependencies, cannot reach a
package index, and our packages are not pip-installed there. Their import names differ from the
directories they live in (setup.py's PACKAGE_DIRS), so they are made importable through a folder
of symbolic links named as they are imported.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Where `make gpu-wheels` puts SmolLM2's tokenizer inside the wheel folder: the random model
# the check trains needs one, and the SmolLM2 GGUF it comes from is too big to travel.
TOKENIZER_FOLDER = "tokenizer"


def install_wheels(folder: Path, target: Path) -> Path:
    """Install every wheel in `folder` into `target`, offline and without dependencies (the
    folder holds every one the machine lacks); `target` goes first on the import path."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"{folder} holds no wheels: run `make gpu-wheels` where pip works.")
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"),
            *("--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target)),
            *map(str, wheels),
        ],
        check=True,
    )
    return target


def package_dirs() -> dict[str, str]:
    """setup.py's PACKAGE_DIRS (import name -> directory), read without running setup()."""
    for node in ast.parse((REPO / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "PACKAGE_DIRS" for target in node.targets
        ):
            dirs: dict[str, str] = ast.literal_eval(node.value)
            return dirs
    raise SystemExit("setup.py has no PACKAGE_DIRS: the import names of our packages are unknown.")


def link_our_packages(folder: Path) -> Path | None:
    """A folder of links that makes our packages importable, where they are not installed
    (None where they are: an editable install here already maps the same directories)."""
    dirs = package_dirs()
    if all(importlib.util.find_spec(name) is not None for name in dirs):
        return None
    folder.mkdir(parents=True, exist_ok=True)
    for name, directory in dirs.items():
        link = folder / name
        if not link.exists():
            link.symlink_to(REPO / directory, target_is_directory=True)
    return folder
