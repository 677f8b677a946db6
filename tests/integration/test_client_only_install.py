"""The client installed alone, as `pipx install backpropagate` installs it: no extras, so no
torch, no llama.cpp and none of the services' own dependencies.

It is built from this checkout into a fresh virtual environment and run as a user runs it:
against a stack (`backprop serve all` in the project's environment) it prepares a dataset,
trains a run and reads it back; with no endpoint it says which extra to install or which endpoint
to set, with exit code 1, instead of failing on an import.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import servers
from service_processes import serve

REPO = Path(__file__).resolve().parents[2]
# What building the package reads: its metadata and the three package directories.
PACKAGE_SOURCES = ["pyproject.toml", "setup.py", "README.md", "cli", "proto", "services"]
TOKEN = "client-only-token-0123456789abcdef"


@dataclass(frozen=True)
class ClientInstall:
    venv: Path

    def backprop(
        self, *args: str, env: dict[str, str], timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.venv / "bin" / "backprop"), *args],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def has_module(self, name: str) -> bool:
        probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is None)"
        return subprocess.run([str(self.venv / "bin" / "python"), "-c", probe]).returncode == 0


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> ClientInstall:
    """`pip install <checkout>` (no extras) into a new virtual environment, from a copy of the
    checkout so that building leaves nothing in the working tree."""
    root = tmp_path_factory.mktemp("client-only")
    source = root / "source"
    for name in PACKAGE_SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(path, source / name)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run(
        [
            str(venv / "bin" / "pip"),
            "install",
            "--quiet",
            "--disable-pip-version-check",
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    return ClientInstall(venv)


def client_env(home: Path, **settings: str) -> dict[str, str]:
    """A user's environment: no BACKPROPAGATE_* setting but those given (without the prefix)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("BACKPROPAGATE_")}
    env |= {"BACKPROPAGATE_HOME": str(home), "HOME": str(home)}
    return env | {f"BACKPROPAGATE_{name}": value for name, value in settings.items()}


def test_the_client_alone_carries_no_torch_and_no_llama_cpp(client: ClientInstall) -> None:
    assert client.has_module("backpropagate")
    assert client.has_module("backpropagate_api")
    assert not client.has_module("torch")
    assert not client.has_module("llama_cpp")
    assert not client.has_module("redis")


def test_with_no_endpoint_the_client_alone_says_what_to_install_or_which_endpoint_to_set(
    client: ClientInstall, quickstart: Path, tmp_path: Path
) -> None:
    answer = client.backprop(
        "train", "--data", str(quickstart), "--steps", "1", env=client_env(tmp_path / "home")
    )

    output = answer.stdout + answer.stderr
    assert answer.returncode == 1, output
    assert "DEP_PACKAGE_MISSING" in output
    assert "pip install 'backpropagate[dataprep,trainer,safety,export,stack]'" in output
    assert "BACKPROPAGATE_ENDPOINT" in output
    assert "Traceback" not in output and "This is a bug" not in output


def test_the_client_alone_refuses_an_open_share_and_names_the_ui_extra(
    client: ClientInstall, tmp_path: Path
) -> None:
    env = client_env(tmp_path / "home")
    share = client.backprop("ui", "--share", env=env)
    served = client.backprop("ui", "--port", str(servers.free_port()), env=env)

    assert share.returncode == 1 and "INPUT_AUTH_REQUIRED" in share.stderr, share
    output = served.stdout + served.stderr
    assert served.returncode == 1, output
    assert "DEP_PACKAGE_MISSING" in output and "pip install 'backpropagate[ui]'" in output
    assert "Traceback" not in output + share.stderr


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`backprop serve all` from the project's own environment, with a token."""
    address = servers.free_address()
    home = tmp_path_factory.mktemp("stack-home")
    env = {**os.environ, "BACKPROPAGATE_HOME": str(home), "BACKPROPAGATE_TOKEN": TOKEN}
    with serve("all", address, env, log_path=home / "serve.log"):
        yield address


@pytest.mark.model
def test_the_client_alone_prepares_trains_and_reads_runs_against_a_stack(
    client: ClientInstall, stack: str, quickstart: Path, tmp_path: Path
) -> None:
    env = client_env(tmp_path / "home", ENDPOINT=stack, TOKEN=TOKEN)

    prepared = client.backprop("data", "prepare", str(quickstart), "--json", env=env)
    assert prepared.returncode == 0, prepared.stderr
    assert int(json.loads(prepared.stdout)["num_examples"]) > 0

    trained = client.backprop("train", "--data", str(quickstart), "--steps", "2", env=env)
    assert trained.returncode == 0, trained.stdout + trained.stderr

    listed = client.backprop("runs", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    (run,) = json.loads(listed.stdout)["runs"]
    shown = client.backprop("runs", "show", run["run_id"], "--json", env=env)
    record = json.loads(shown.stdout)
    assert record["status"] == "JOB_STATUS_SUCCEEDED"
    assert len(record["loss_history"]) == 2
    assert not (tmp_path / "home" / "artifacts").exists()  # nothing ran in the client
