"""What a caller on another machine learns from the model names it sends: nothing about the
server's files.

A real `backprop serve all` listens on this machine's own network address (not loopback) with a
token, so the calls a test makes from here arrive from a peer that is not loopback, as a remote
caller's would, while the packets never leave the machine. Every model path outside
BACKPROPAGATE_MODEL__ALLOWED_DIRS gets one answer, INPUT_MODEL_NOT_ALLOWED, worded the same
whether the path is a model, a plain directory, a file or nothing at all: the allow-list is
checked before the filesystem is asked. A path inside an allowed directory is resolved as
before, and Hub ids stay open.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import servers
from service_processes import serve

from backpropagate.connection import Connection
from backpropagate.workflows import import_adapter
from backpropagate_api.errors import BackpropagateError
from backpropagate_api.settings import Settings
from backpropagate_api.v1 import trainer_pb2
from backpropagate_services.stack import SERVICES

TOKEN = "remote-caller-token-0123456789abcdef"


def own_address() -> str | None:
    """This machine's address on its default route; None if it has only loopback. Connecting a
    UDP socket sends nothing: it only picks the source address the route would use."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never a real destination
        except OSError:
            return None
        host: str = probe.getsockname()[0]
    return None if host.startswith("127.") else host


def hf_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


@dataclass
class Remote:
    connection: Connection  # reaches the server from a peer that is not loopback
    allowed: Path  # the server's BACKPROPAGATE_MODEL__ALLOWED_DIRS
    outside: Path  # a directory of the server's that is not allowed
    adapter: Path  # a peft adapter directory to import


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    host = own_address()
    if host is None:
        # Fails, never skips: a machine with only loopback cannot show what a remote caller sees.
        pytest.fail("this machine has no address but loopback: no remote peer can be made")
    root = tmp_path_factory.mktemp("remote-models")
    allowed, outside = root / "models", root / "elsewhere"
    allowed.mkdir()
    hf_dir(outside / "secret-model")
    (outside / "plain-dir").mkdir()
    (outside / "weights.gguf").write_bytes(b"GGUF")
    (allowed / "escape").symlink_to(outside / "secret-model")
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    env = {key: value for key, value in os.environ.items() if not key.startswith("BACKPROPAGATE_")}
    env |= {
        "BACKPROPAGATE_HOME": str(root / "state"),
        "BACKPROPAGATE_TOKEN": TOKEN,
        "BACKPROPAGATE_SAFETY__SOURCE": "host",
        "BACKPROPAGATE_MODEL__ALLOWED_DIRS": json.dumps([str(allowed)]),
    }
    address = f"{host}:{servers.free_port()}"
    with serve("all", address, env, log_path=root / "serve.log"):
        connection = Connection(dict.fromkeys(SERVICES, address), False, Settings(), token=TOKEN)
        try:
            yield Remote(connection, allowed, outside, adapter)
        finally:
            connection.close()


def submit_train(remote: Remote, spec: str) -> None:
    connection = remote.connection
    request = trainer_pb2.SubmitTrainRequest(
        dataset_id="", config=trainer_pb2.TrainConfig(base_model=spec)
    )
    connection.call("trainer", connection.trainer.SubmitTrain, request)


def import_with_base(remote: Remote, spec: str) -> None:
    import_adapter(remote.connection, remote.adapter, spec)


CALLS: dict[str, Callable[[Remote, str], None]] = {
    "SubmitTrain": submit_train,
    "ImportAdapter": import_with_base,
}


def answer(call: Callable[[Remote, str], None], remote: Remote, spec: str) -> BackpropagateError:
    with pytest.raises(BackpropagateError) as refused:
        call(remote, spec)
    return refused.value


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_every_path_outside_the_allowed_directories_gets_one_answer_that_says_nothing_of_it(
    remote: Remote, call: Callable[[Remote, str], None]
) -> None:
    outside = remote.outside
    specs = [
        str(outside / "secret-model"),  # a model
        str(outside / "plain-dir"),  # a directory that is no model
        str(outside / "weights.gguf"),  # a file
        str(outside / "missing.gguf"),  # nothing
        str(outside / "missing-dir"),
        "/etc",
        "../../etc/passwd",
    ]

    answers = {spec: answer(call, remote, spec) for spec in specs}

    for spec, error in answers.items():
        assert error.code == "INPUT_MODEL_NOT_ALLOWED", (spec, error)
        assert "ALLOWED_DIRS" in error.hint
    worded = {error.message.replace(spec, "<path>") for spec, error in answers.items()}
    assert len(worded) == 1, worded


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_a_symlink_out_of_an_allowed_directory_is_refused_without_naming_its_target(
    remote: Remote, call: Callable[[Remote, str], None]
) -> None:
    error = answer(call, remote, str(remote.allowed / "escape"))

    assert error.code == "INPUT_MODEL_NOT_ALLOWED"
    assert str(remote.outside) not in str(error.to_dict())


def test_inside_the_allowed_directories_a_path_is_resolved_and_hub_ids_stay_open(
    remote: Remote,
) -> None:
    missing = answer(submit_train, remote, str(remote.allowed / "missing.gguf"))
    hub = answer(submit_train, remote, "HuggingFaceTB/SmolLM2-135M-Instruct")

    assert missing.code == "INPUT_MODEL_NOT_FOUND"
    assert hub.code == "INPUT_NOT_FOUND" and "dataset" in hub.message.lower()  # past the model
