"""deploy/build_images.py as a module: a script, not a package, that tests call into."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def build_images_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_images", REPO / "deploy/build_images.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_images"] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module
