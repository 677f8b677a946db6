"""Taking in an adapter directory: files land inside it, and only a real adapter is accepted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backpropagate_api.errors import ConfigError, UserError
from backpropagate_api.v1 import trainer_pb2
from backpropagate_services.trainer.imports import adapter_base_model, receive_adapter_files


def chunks(*files: tuple[str, bytes]) -> list[trainer_pb2.AdapterFileChunk]:
    return [trainer_pb2.AdapterFileChunk(path=path, data=data) for path, data in files]


def test_files_are_written_under_the_destination_with_their_chunks_appended(tmp_path: Path):
    receive_adapter_files(
        chunks(("adapter_config.json", b"{}"), ("sub/w.bin", b"ab"), ("sub/w.bin", b"cd")),
        tmp_path,
    )

    assert (tmp_path / "sub" / "w.bin").read_bytes() == b"abcd"
    assert (tmp_path / "adapter_config.json").read_bytes() == b"{}"


@pytest.mark.parametrize("path", ["../escape", "/etc/passwd", "a/../../b", "", "a\\..\\b"])
def test_a_path_that_leaves_the_adapter_directory_is_refused(tmp_path: Path, path: str):
    with pytest.raises(UserError, match="Refused adapter file path"):
        receive_adapter_files(chunks((path, b"x")), tmp_path / "adapter")

    assert not (tmp_path / "escape").exists()


def test_more_bytes_than_an_adapter_can_have_are_refused(tmp_path: Path):
    with pytest.raises(UserError, match="larger than"):
        receive_adapter_files(chunks(("w.bin", b"x" * 11)), tmp_path, max_bytes=10)


def test_the_base_model_comes_from_the_request_or_else_the_adapter_config(tmp_path: Path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "org/base"})
    )

    assert adapter_base_model(tmp_path, "") == "org/base"
    assert adapter_base_model(tmp_path, "other/base") == "other/base"
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="which base model"):
        adapter_base_model(tmp_path, "")


def test_a_directory_without_adapter_files_is_no_adapter(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")

    with pytest.raises(UserError, match="no peft adapter"):
        adapter_base_model(tmp_path, "")


@pytest.mark.parametrize(
    "path",
    [".", "a/.", "./a", "a//b", "a/", "adapter\x00config.json", "x" * 300, "d/" * 600 + "f"],
    ids=lambda path: repr(path)[:20],
)
def test_a_path_that_names_no_file_is_refused(tmp_path: Path, path: str):
    with pytest.raises(UserError, match="Refused adapter file path") as refused:
        receive_adapter_files(chunks((path, b"x")), tmp_path / "adapter")

    assert len(refused.value.message) < 400


@pytest.mark.parametrize("paths", [("a", "a/b"), ("a/b", "a"), ("a/b/c", "a/b")])
def test_a_file_and_a_directory_of_the_same_name_are_refused(tmp_path: Path, paths: tuple):
    with pytest.raises(UserError, match="both a file and a directory"):
        receive_adapter_files(chunks(*((path, b"x") for path in paths)), tmp_path)


@pytest.mark.parametrize(
    "config",
    [
        b"[]",
        b'"adapter"',
        b"null",
        b'{"r": 1000000}',
        b'{"r": 0}',
        b'{"r": 1.5}',
        b'{"r": true}',
        b'{"r": "8"}',
        b'{"r": 8, "rank_pattern": {"q_proj": 1000000}}',
        b'{"r": 8, "rank_pattern": ["q_proj"]}',
    ],
)
def test_an_adapter_config_peft_could_not_build_within_bounds_is_refused(
    tmp_path: Path, config: bytes
):
    """peft builds every layer's factors at the config's rank before it loads the weights: a
    huge rank is refused before anything is loaded."""
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "adapter_config.json").write_bytes(config)

    with pytest.raises(UserError, match=r"adapter_config\.json"):
        adapter_base_model(tmp_path, "org/base")


def test_an_adapter_within_the_rank_bound_is_taken(tmp_path: Path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"r": 1024, "rank_pattern": {"q_proj": 64}, "base_model_name_or_path": "o/b"})
    )

    assert adapter_base_model(tmp_path, "") == "o/b"
