"""Which base models a caller may name: a caller on another machine names hub ids, the offline
default, or a model under the stack's allowed directories (symlinks followed); a caller on this
machine names any path. A non-loopback peer cannot be made here (tests reach loopback only), so
the rule is checked on the peer strings gRPC hands the servicers."""

from __future__ import annotations

from pathlib import Path

import pytest

from backpropagate_api.errors import ModelNotAllowedError
from backpropagate_services.common.models import (
    OFFLINE_DEFAULT_ALIAS,
    peer_is_local,
    resolve_model_for,
)

REMOTE = "ipv4:10.1.2.3:50123"


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("ipv4:127.0.0.1:5000", True),
        ("ipv6:[::1]:5000", True),
        ("ipv6:%5B::1%5D:5000", True),
        ("unix:/tmp/socket", True),
        ("ipv4:10.1.2.3:5000", False),
        ("ipv6:%5B2001:db8::1%5D:5000", False),
        ("ipv4:0.0.0.0:5000", False),
        ("", False),
        ("garbage", False),
    ],
)
def test_which_peers_are_on_this_machine(peer: str, local: bool) -> None:
    assert peer_is_local(peer) is local


def hf_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_a_remote_caller_names_models_in_the_allowed_directories_only(tmp_path: Path) -> None:
    allowed = tmp_path / "models"
    inside = hf_dir(allowed / "mine")
    outside = hf_dir(tmp_path / "elsewhere" / "secret-model")
    escape = allowed / "link"
    escape.symlink_to(outside)

    assert resolve_model_for(REMOTE, str(inside), "auto", [allowed]).location == str(inside)
    resolve_model_for(REMOTE, "Qwen/Qwen2.5-7B-Instruct", "auto", [])
    resolve_model_for(REMOTE, OFFLINE_DEFAULT_ALIAS, "auto", [])
    for refused in (outside, escape, allowed / ".." / "elsewhere" / "secret-model"):
        with pytest.raises(ModelNotAllowedError) as caught:
            resolve_model_for(REMOTE, str(refused), "auto", [allowed])
        assert caught.value.code == "INPUT_MODEL_NOT_ALLOWED"
        assert caught.value.grpc_status == "PERMISSION_DENIED"
        assert "ALLOWED_DIRS" in caught.value.hint
    with pytest.raises(ModelNotAllowedError):
        resolve_model_for(REMOTE, str(inside), "auto", [])  # none allowed by default


def test_a_remote_caller_that_names_no_model_gets_the_stacks_default(tmp_path: Path) -> None:
    default = hf_dir(tmp_path / "operators-default")

    assert resolve_model_for(REMOTE, "", str(default), []).location == str(default)


def test_a_caller_on_this_machine_names_any_path(tmp_path: Path) -> None:
    model = hf_dir(tmp_path / "anywhere")
    resolve_model_for("ipv4:127.0.0.1:40000", str(model), "auto", [])
