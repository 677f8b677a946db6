"""Fixtures of the reliability drills."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def home_env(model_cache: Path, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "BACKPROPAGATE_HOME": str(tmp_path / "home"),
        "BACKPROPAGATE_MODEL_CACHE": str(model_cache),
        "COLUMNS": "200",
    }
