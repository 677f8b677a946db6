"""What every ArtifactStore promises, checked against a local directory and real S3 (moto) alike.

A service is written against this contract, not against an implementation: a test that passes for
one and not the other is a bug in the implementation.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import BinaryIO
from uuid import uuid4

import pytest
import urllib3
from minio import Minio
from servers import LOOPBACK, free_port

from backpropagate_api.errors import (
    ArtifactInvalidError,
    ConfigError,
    NotFoundError,
    StoreUnavailableError,
    UserError,
)
from backpropagate_api.settings import StoreSettings
from backpropagate_api.uploads import sha256_file
from backpropagate_services.common.store.base import MANIFEST, ArtifactStore
from backpropagate_services.common.store.local import LocalDirStore
from backpropagate_services.common.store.s3 import S3Store


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    """A fresh, empty store: its own directory, or its own bucket on the session's S3."""
    if request.param == "s3":
        settings = StoreSettings(
            backend="s3",
            s3_endpoint=request.getfixturevalue("s3_endpoint"),
            s3_bucket=f"test-{uuid4().hex}",
            s3_access_key="test-access-key",  # moto takes any pair
            s3_secret_key="test-secret-key",
        )
        return S3Store.from_settings(settings)
    return LocalDirStore(tmp_path / "store")


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def test_bytes_put_are_read_back_with_their_size(store: ArtifactStore) -> None:
    store.put_bytes("datasets/abc/data.jsonl", b'{"text": "hi"}\n')

    assert store.get_bytes("datasets/abc/data.jsonl") == b'{"text": "hi"}\n'
    assert store.size("datasets/abc/data.jsonl") == 15
    assert store.exists("datasets/abc/data.jsonl")


def test_put_replaces_an_existing_object(store: ArtifactStore) -> None:
    store.put_bytes("runs/r1/state.json", b"old")

    store.put_bytes("runs/r1/state.json", b"new")

    assert store.get_bytes("runs/r1/state.json") == b"new"


def test_file_larger_than_one_upload_part_roundtrips_byte_for_byte(
    store: ArtifactStore, tmp_path: Path
) -> None:
    source = tmp_path / "adapter.safetensors"
    source.write_bytes(os.urandom(6 * 1024 * 1024 + 7))  # S3 uploads > 5 MiB in parts

    store.put_file("runs/r1/adapter.safetensors", source)
    copy = store.download("runs/r1/adapter.safetensors", tmp_path / "out" / "copy")

    assert store.size("runs/r1/adapter.safetensors") == source.stat().st_size
    assert sha256_file(copy) == sha256_file(source)


def test_iter_chunks_streams_the_object_in_chunks_no_larger_than_asked(
    store: ArtifactStore,
) -> None:
    store.put_bytes("logs/r1.txt", b"0123456789")

    chunks = list(store.iter_chunks("logs/r1.txt", chunk_size=4))

    assert b"".join(chunks) == b"0123456789"
    assert len(chunks) >= 3 and all(len(chunk) <= 4 for chunk in chunks)


def test_iter_chunks_from_an_offset_resumes_where_a_download_stopped(
    store: ArtifactStore,
) -> None:
    store.put_bytes("logs/r2.txt", b"0123456789")

    assert b"".join(store.iter_chunks("logs/r2.txt", chunk_size=4, offset=6)) == b"6789"
    assert b"".join(store.iter_chunks("logs/r2.txt", offset=10)) == b""


def test_missing_key_raises_not_found(store: ArtifactStore) -> None:
    assert not store.exists("runs/nope/state.json")
    with pytest.raises(NotFoundError):
        store.get_bytes("runs/nope/state.json")
    with pytest.raises(NotFoundError):
        store.size("runs/nope/state.json")


def test_list_returns_the_keys_under_a_prefix_sorted(store: ArtifactStore) -> None:
    for key in ["runs/b/x", "runs/a/2", "runs/a/10", "runs/ab/y", "datasets/d"]:
        store.put_bytes(key, b".")

    assert store.list("runs/a/") == ["runs/a/10", "runs/a/2"]
    assert store.list("runs/a") == ["runs/a/10", "runs/a/2", "runs/ab/y"]
    assert store.list("") == ["datasets/d", "runs/a/10", "runs/a/2", "runs/ab/y", "runs/b/x"]
    assert store.list("nothing/") == []


def test_delete_prefix_removes_only_the_keys_under_it(store: ArtifactStore) -> None:
    for key in ["runs/a/adapter/w.bin", "runs/a/state.json", "runs/ab/state.json"]:
        store.put_bytes(key, b".")

    store.delete_prefix("runs/a/")

    assert store.list("") == ["runs/ab/state.json"]
    assert not store.exists("runs/a/state.json")


def test_put_dir_and_get_dir_roundtrip_a_directory_tree(
    store: ArtifactStore, tmp_path: Path
) -> None:
    files = {
        "adapter_config.json": b"{}",
        "weights/adapter.bin": b"\x00\x01" * 1000,
        ".gitattributes": b"*.bin filter=lfs",
    }
    source = write_tree(tmp_path / "source", files)

    manifest = store.put_dir("runs/r1/adapter/", source)
    restored = store.get_dir("runs/r1/adapter", tmp_path / "restored")

    assert sorted(manifest["files"]) == sorted(files)
    assert store.exists(f"runs/r1/adapter/{MANIFEST}")
    assert {
        path.relative_to(restored).as_posix(): path.read_bytes()
        for path in restored.rglob("*")
        if path.is_file()
    } == files


def test_get_dir_refuses_a_directory_without_manifest(store: ArtifactStore, tmp_path: Path) -> None:
    store.put_bytes("runs/r1/adapter/weights.bin", b"half of an upload")

    with pytest.raises(NotFoundError, match=MANIFEST):
        store.get_dir("runs/r1/adapter", tmp_path / "restored")


@pytest.mark.parametrize(
    "entry",
    ["../../escaped.txt", "/tmp/escaped.txt", "weights/../../escaped.txt", "a//b", "C:evil"],
)
def test_get_dir_refuses_a_manifest_entry_outside_the_directory_and_writes_nothing(
    store: ArtifactStore, tmp_path: Path, entry: str
) -> None:
    store.put_dir("runs/r1/adapter", write_tree(tmp_path / "source", {"a.json": b"{}"}))
    store.put_bytes("escaped.txt", b"planted")
    digest = hashlib.sha256(b"planted").hexdigest()
    manifest = {"files": {entry: {"sha256": digest, "size": 7}}}
    store.put_json(f"runs/r1/adapter/{MANIFEST}", manifest)
    destination = tmp_path / "deep" / "er" / "restored"

    with pytest.raises(ArtifactInvalidError) as refused:
        store.get_dir("runs/r1/adapter", destination)

    assert refused.value.code == "STATE_ARTIFACT_INVALID"
    assert entry in refused.value.message
    assert [path for path in (tmp_path / "deep").rglob("*") if path.is_file()] == []
    assert not Path("/tmp/escaped.txt").exists()


@pytest.mark.parametrize(
    "manifest",
    [
        {"files": ["a.json"]},
        {"files": {"a.json": {"size": 2}}},
        {"files": {"a.json": {"size": "2", "sha256": "0" * 64}}},
        {"files": {"a.json": {"size": -1, "sha256": "0" * 64}}},
        ["a.json"],
    ],
)
def test_get_dir_refuses_a_malformed_manifest(
    store: ArtifactStore, tmp_path: Path, manifest: object
) -> None:
    store.put_dir("runs/r1/adapter", write_tree(tmp_path / "source", {"a.json": b"{}"}))
    store.put_json(f"runs/r1/adapter/{MANIFEST}", manifest)

    with pytest.raises(ArtifactInvalidError):
        store.get_dir("runs/r1/adapter", tmp_path / "restored")


@pytest.mark.parametrize("tampered", [b"{'evil': 1}", b"{}\n"])  # other bytes; another size
def test_get_dir_refuses_a_file_changed_after_its_commit_and_keeps_no_copy(
    store: ArtifactStore, tmp_path: Path, tampered: bytes
) -> None:
    files = {"adapter_config.json": b'{"r": 8}', "weights.bin": b"\x00" * 64}
    store.put_dir("runs/r1/adapter", write_tree(tmp_path / "source", files))
    store.put_bytes("runs/r1/adapter/weights.bin", tampered)

    with pytest.raises(ArtifactInvalidError, match=r"weights\.bin"):
        store.get_dir("runs/r1/adapter", tmp_path / "restored")

    assert not (tmp_path / "restored" / "weights.bin").exists()


def test_download_of_a_missing_key_leaves_no_partial_file(
    store: ArtifactStore, tmp_path: Path
) -> None:
    destination = tmp_path / "out" / "model.gguf"

    with pytest.raises(NotFoundError):
        store.download("runs/nope/model.gguf", destination)

    assert list(destination.parent.iterdir()) == []


# -- local directory only -----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["../escape", "runs/../../escape", "/tmp/escape"])
def test_local_store_rejects_keys_that_escape_its_root(tmp_path: Path, key: str) -> None:
    store = LocalDirStore(tmp_path / "store")

    with pytest.raises(UserError, match="outside the store"):
        store.put_bytes(key, b"x")

    assert sorted(path.name for path in tmp_path.iterdir()) == ["store"]


def test_local_write_interrupted_midway_keeps_the_old_object_and_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalDirStore(tmp_path / "store")
    store.put_bytes("runs/r1/model.gguf", b"old")
    source = tmp_path / "new.gguf"
    source.write_bytes(b"new and much longer")

    def copy_half_then_fail(source: BinaryIO, target: BinaryIO, length: int = 0) -> None:
        target.write(source.read(3))
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copyfileobj", copy_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        store.put_file("runs/r1/model.gguf", source)

    assert store.get_bytes("runs/r1/model.gguf") == b"old"
    assert store.list("") == ["runs/r1/model.gguf"]
    assert os.listdir(tmp_path / "store" / "runs" / "r1") == ["model.gguf"]


# -- S3 down ------------------------------------------------------------------------------------


def test_unreachable_s3_raises_store_unavailable() -> None:
    port = free_port()  # nothing listens there
    # No HTTP retries: minio's default client retries for seconds before giving up.
    client = Minio(
        f"{LOOPBACK}:{port}",
        access_key="test",
        secret_key="test",
        secure=False,
        http_client=urllib3.PoolManager(retries=False),
    )

    with pytest.raises(StoreUnavailableError, match=str(port)):
        S3Store(client, "backpropagate")


@pytest.mark.parametrize("given", [{}, {"s3_access_key": "only-the-access-key"}])
def test_s3_without_credentials_is_refused_naming_the_settings_to_set(
    s3_endpoint: str, given: dict[str, str]
) -> None:
    settings = StoreSettings(backend="s3", s3_endpoint=s3_endpoint, **given)  # type: ignore[arg-type]

    with pytest.raises(ConfigError) as refused:
        S3Store.from_settings(settings)

    assert refused.value.code == "INPUT_CONFIG_INVALID"
    assert "BACKPROPAGATE_STORE__S3_SECRET_KEY" in refused.value.message
    assert ("BACKPROPAGATE_STORE__S3_ACCESS_KEY" in refused.value.message) is (not given)
    assert "make env" in refused.value.hint
