"""Where an export's files land: their own names, never over another export's files, never
outside the directory they are downloaded into, whatever names the server sends."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from backpropagate.workflows import download_plan
from backpropagate_api.errors import PathOutsideDirectoryError
from backpropagate_api.v1 import export_pb2


def export_of(*files: tuple[str, bytes]) -> export_pb2.ExportResult:
    return export_pb2.ExportResult(
        export_id="export-20261124T120000-a1b2c3",
        files=[
            export_pb2.ExportFile(
                name=name, key=f"exports/x/{name}", sha256=hashlib.sha256(data).hexdigest()
            )
            for name, data in files
        ],
    )


def test_files_go_under_their_own_names_when_nothing_is_there(tmp_path: Path):
    result = export_of(("m-run-1-q8_0.gguf", b"a"), ("m-run-1-hf/config.json", b"{}"))

    assert sorted(download_plan(result, tmp_path).values()) == [
        tmp_path / "m-run-1-hf" / "config.json",
        tmp_path / "m-run-1-q8_0.gguf",
    ]


def test_a_name_taken_by_another_exports_file_gets_this_exports_suffix(tmp_path: Path):
    (tmp_path / "m-run-1-q8_0.gguf").write_bytes(b"another export")
    (tmp_path / "m-run-1-hf").mkdir()
    (tmp_path / "m-run-1-hf" / "config.json").write_bytes(b"other")
    result = export_of(("m-run-1-q8_0.gguf", b"a"), ("m-run-1-hf/config.json", b"{}"))

    assert sorted(download_plan(result, tmp_path).values()) == [
        tmp_path / "m-run-1-hf-a1b2c3" / "config.json",
        tmp_path / "m-run-1-q8_0-a1b2c3.gguf",
    ]


def test_the_same_files_already_there_are_reused_not_duplicated(tmp_path: Path):
    (tmp_path / "m-run-1-q8_0.gguf").write_bytes(b"a")
    result = export_of(("m-run-1-q8_0.gguf", b"a"))

    assert list(download_plan(result, tmp_path).values()) == [tmp_path / "m-run-1-q8_0.gguf"]


@pytest.mark.parametrize(
    "name",
    [
        "../../.bashrc",
        "/home/someone/.bashrc",
        "m-run-1-hf/../../../.bashrc",
        "m-run-1-hf//config.json",
        "./m-run-1.gguf",
        "",
        "..\\..\\.bashrc",
        "C:/Users/someone/.bashrc",
        "m-run-1.gguf\x00",
    ],
)
def test_a_server_name_that_would_leave_the_output_directory_is_refused(tmp_path: Path, name: str):
    result = export_of(("m-run-1-q8_0.gguf", b"a"), (name, b"b"))

    with pytest.raises(PathOutsideDirectoryError) as refused:
        download_plan(result, tmp_path / "out")

    assert refused.value.code == "INPUT_PATH_OUTSIDE_DIRECTORY"
    assert not (tmp_path / "out").exists()


def test_an_export_id_cannot_steer_a_renamed_file_out_of_the_output_directory(tmp_path: Path):
    (tmp_path / "m-run-1-q8_0.gguf").write_bytes(b"another export")
    result = export_of(("m-run-1-q8_0.gguf", b"a"))
    result.export_id = "export-x/../../../.bashrc"  # its last part is the renamed file's suffix

    with pytest.raises(PathOutsideDirectoryError):
        download_plan(result, tmp_path)
