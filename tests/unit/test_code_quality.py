"""The repository's own style gates, so CI (which runs `make test`) enforces them too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)


def test_ruff_finds_no_lint_problems() -> None:
    result = run(str(BIN / "ruff"), "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_leaves_every_file_unchanged() -> None:
    result = run(str(BIN / "ruff"), "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_passes_on_the_api_common_and_the_client() -> None:
    result = run(
        str(BIN / "mypy"),
        "proto/backpropagate_api",
        "services/common",
        "cli/backpropagate",
        "services/stack.py",
    )
    assert result.returncode == 0, result.stdout + result.stderr
