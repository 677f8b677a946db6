"""Commands that only read answer at once: in the embedded default, `runs list`, `runs show`,
`info` and `config` read the home's files and this machine's readings, and start no service and
import no torch (starting the four servicers for them took about 4 s of CPU).

Each runs the real CLI in a fresh process, which reports on exit whether torch was imported. The
run they read is a record the trainer's own record code stored in the home's store.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_process import user_environment

from backpropagate.environment import REPORTED_PACKAGES
from backpropagate_api.layout import run_record_key
from backpropagate_api.settings import Settings
from backpropagate_api.v1 import common_pb2, trainer_pb2
from backpropagate_services.common.records import save_record
from backpropagate_services.common.store import make_store

RUN_ID = "run-20260102T030405-a1b2c3"
# The CLI's entry point, and on exit a line saying whether anything imported torch.
PROBE = """
import atexit, sys
atexit.register(lambda: print("torch imported:", "torch" in sys.modules, file=sys.stderr))
from backpropagate.cli import main
sys.argv = ["backprop", *sys.argv[1:]]
main()
"""


def backprop_probed(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        cwd=home,
        env=user_environment(home),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def home_with_a_run(tmp_path: Path) -> Path:
    settings = Settings(home=tmp_path / "state")
    record = trainer_pb2.RunRecord(
        run_id=RUN_ID,
        status=common_pb2.JOB_STATUS_SUCCEEDED,
        base_model="SmolLM2-135M-Instruct",
        steps=2,
        final_loss=1.25,
        loss_history=[1.5, 1.25],
    )
    save_record(make_store(settings), run_record_key(RUN_ID), record)
    return tmp_path


@pytest.mark.parametrize(
    "args",
    [("runs", "list", "--json"), ("runs", "show", "a1b2c3", "--json"), ("info",), ("config",)],
)
def test_a_reading_command_starts_no_service_and_imports_no_torch(
    home_with_a_run: Path, args: tuple[str, ...]
) -> None:
    done = backprop_probed(home_with_a_run, *args)

    assert done.returncode == 0, done.stderr
    assert "torch imported: False" in done.stderr
    assert not (home_with_a_run / "state" / "logs").exists()  # the embedded stack logs there
    if args[:2] == ("runs", "show"):
        assert json.loads(done.stdout)["final_loss"] == 1.25
    if args[:2] == ("runs", "list"):
        assert [run["run_id"] for run in json.loads(done.stdout)["runs"]] == [RUN_ID]


def test_info_prints_what_a_bug_report_needs(tmp_path: Path) -> None:
    done = backprop_probed(tmp_path, "info", "--json")

    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    for label in ("python", "os", *REPORTED_PACKAGES, "nvidia driver", "extras installed"):
        assert info[label], label
    assert info["torch"].startswith("2.")  # its version, read without importing it
    assert "trainer" in info["extras installed"].split(", ")
    assert info["default model"].startswith("SmolLM2-135M-Instruct (auto: no CUDA GPU")
    assert info["mode"] == "embedded (in this process)" and info["safety"] == "safe (host)"
