"""The committed gRPC stubs in proto/backpropagate_api/v1 are exactly what `make proto` makes now.

They are committed so the light client install needs no protoc; this test regenerates them into
a temporary directory and fails, naming each file, when a proto changed without `make proto`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from backpropagate_services.common.protogen import (
    PACKAGE_DIR,
    PROTO_ROOT,
    generate,
    proto_files,
)

COMMITTED = PROTO_ROOT / PACKAGE_DIR


def generated_files(directory: Path) -> dict[str, bytes]:
    """Name -> bytes of each stub in `directory` (caches and subdirectories are not stubs)."""
    return {
        path.name: path.read_bytes()
        for path in directory.iterdir()
        if path.is_file() and path.suffix in {".py", ".pyi"}
    }


def differences(committed: Path, fresh: Path) -> dict[str, str]:
    """What is wrong with the committed stubs, file by file; empty when they are up to date."""
    have, want = generated_files(committed), generated_files(fresh)
    problems = {name: "missing: run `make proto`" for name in want.keys() - have.keys()}
    problems |= {name: "no proto makes it any more" for name in have.keys() - want.keys()}
    problems |= {
        name: "differs from a fresh `make proto`"
        for name in have.keys() & want.keys()
        if have[name] != want[name]
    }
    return problems


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out_root = tmp_path_factory.mktemp("protogen")
    with pytest.MonkeyPatch.context() as patch:
        # `generate` puts the venv's bin first on PATH for protoc's plugin; undo that afterwards.
        patch.setenv("PATH", os.environ.get("PATH", ""))
        generate(out_root)
    yield out_root / PACKAGE_DIR


def test_committed_stubs_are_byte_identical_to_freshly_generated_ones(fresh: Path) -> None:
    assert differences(COMMITTED, fresh) == {}


def test_every_proto_gets_message_grpc_and_typing_stubs(fresh: Path) -> None:
    stems = [path.stem for path in proto_files()]
    stubs = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")

    assert {"common", "dataprep", "trainer", "safety", "export"} <= set(stems)
    assert set(generated_files(fresh)) == {"__init__.py"} | {
        f"{stem}{stub}" for stem in stems for stub in stubs
    }


# --- the comparison itself can fail ------------------------------------------------------------


@pytest.fixture
def copy(fresh: Path, tmp_path: Path) -> Path:
    """A second, editable copy of the fresh stubs, standing in for a committed directory."""
    return Path(shutil.copytree(fresh, tmp_path / "v1"))


def test_an_edited_stub_is_reported_as_differing(fresh: Path, copy: Path) -> None:
    stub = copy / "dataprep_pb2.py"
    stub.write_bytes(stub.read_bytes() + b"\n# hand edit\n")

    assert differences(copy, fresh) == {"dataprep_pb2.py": "differs from a fresh `make proto`"}


def test_a_stub_missing_from_the_committed_set_is_reported(fresh: Path, copy: Path) -> None:
    (copy / "safety_pb2_grpc.py").unlink()

    assert differences(copy, fresh) == {"safety_pb2_grpc.py": "missing: run `make proto`"}


def test_a_committed_stub_no_proto_makes_is_reported(fresh: Path, copy: Path) -> None:
    (copy / "legacy_pb2.py").write_text("# from a deleted proto\n")

    assert differences(copy, fresh) == {"legacy_pb2.py": "no proto makes it any more"}


def test_caches_next_to_the_stubs_are_not_stubs(fresh: Path, copy: Path) -> None:
    (copy / "__pycache__").mkdir()
    (copy / "__pycache__" / "common_pb2.cpython-311.pyc").write_bytes(b"\0")

    assert differences(copy, fresh) == {}
