"""The committed reference pages in docs/reference are exactly what `make docs` makes now.

They are generated from the code (the Typer app, the settings, the error registry, the protos);
this test regenerates them into a temporary directory and fails, naming each stale page, when
a command, option, setting, error or message changed without `make docs`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from backpropagate.reference import PAGES, generate

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "reference"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("reference")
    generate(directory)
    return directory


@pytest.mark.parametrize("page", sorted(PAGES))
def test_the_committed_reference_page_is_what_make_docs_makes_now(fresh: Path, page: str) -> None:
    committed = COMMITTED / page

    assert committed.is_file(), f"docs/reference/{page} is missing: run `make docs`"
    assert committed.read_text() == (fresh / page).read_text(), (
        f"docs/reference/{page} is stale: run `make docs`"
    )
