"""The reference pages, generated from the code so they cannot drift (`make docs`).

docs/reference/cli.md from the Typer app, settings.md from the settings classes, errors.md from
the error registry, grpc.md from the .proto files. tests/unit/test_reference_docs_are_fresh.py
regenerates them and fails, naming the page, when a committed one is stale.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from backpropagate.reference.cli_page import cli_page
from backpropagate.reference.errors_page import errors_page
from backpropagate.reference.grpc_page import grpc_page
from backpropagate.reference.settings_page import settings_page

PAGES: dict[str, Callable[[], str]] = {
    "cli.md": cli_page,
    "settings.md": settings_page,
    "errors.md": errors_page,
    "grpc.md": grpc_page,
}


def generate(directory: Path) -> list[Path]:
    """Write every page into `directory`; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, page in PAGES.items():
        path = directory / name
        path.write_text(page())
        written.append(path)
    return written
