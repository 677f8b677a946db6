"""The GPU check (bench/gpu_check.py, `make gpu-check`, docs/gpu.md) on a machine without CUDA:
the dry run lists every step, each GPU one "skipped: no CUDA"; `--device cpu --tiny` trains the
steps a CPU can take through the product's own code, on a tiny random model; a step that fails
or runs past its limit is reported as FAILED with what went wrong, and the others still run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from gpu_check import run_child
from gpu_steps import STEPS, STEPS_BY_NAME, Check, write_rows

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.py"
NO_CUDA = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
CPU_STEPS = [step.name for step in STEPS if step.on_cpu]
GPU_STEPS = [step.name for step in STEPS if not step.on_cpu]
TRAINING_STEPS = ("lora", "dora", "dpo")  # through the SDK's embedded stack: a run record each


def gpu_check(*arguments: str, json_path: Path) -> tuple[subprocess.CompletedProcess[str], Any]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *arguments, "--json", str(json_path)],
        capture_output=True,
        text=True,
        env=NO_CUDA,
        timeout=600,
    )
    rows = json.loads(json_path.read_text())["steps"] if json_path.is_file() else None
    return done, {row["name"]: row for row in rows or []}


def test_dry_run_lists_every_step_each_skipped_for_want_of_cuda(tmp_path: Path) -> None:
    table = tmp_path / "dry.json"
    done = subprocess.run(
        ["make", "-s", "gpu-check", f"GPU_CHECK_ARGS=--json {table}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=NO_CUDA,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(table.read_text())["steps"]
    assert [row["name"] for row in rows] == [step.name for step in STEPS]
    assert {row["status"] for row in rows} == {"skipped: no CUDA"}
    printed = [line for line in done.stdout.splitlines() if "skipped: no CUDA" in line]
    assert [line.split("|")[1].strip() for line in printed] == [step.name for step in STEPS]


def test_tiny_cpu_run_trains_the_cpu_steps_through_the_product(tmp_path: Path) -> None:
    done, rows = gpu_check("--device", "cpu", "--tiny", json_path=tmp_path / "tiny.json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert {name: rows[name]["status"] for name in CPU_STEPS} == dict.fromkeys(CPU_STEPS, "ok")
    assert {rows[name]["status"] for name in GPU_STEPS} == {"skipped: no CUDA"}
    for name in TRAINING_STEPS:
        row = rows[name]
        assert row["tokens_per_second"] > 0 and row["peak_bytes"] > 0, row
        assert row["estimate_bytes"] > 0 and row["peak_over_estimate"] > 0, row
        assert row["extra"]["run_id"] and row["extra"]["micro_batch"] == (2 if name == "dpo" else 4)
    assert rows["baseline"]["tokens_per_second"] > 0 and rows["baseline"]["peak_bytes"] > 0
    assert rows["lora"]["vs_baseline"] > 0 and rows["dora"]["vs_baseline"] > 0
    assert rows["dpo"]["vs_baseline"] is None  # other rows, other data: no ratio
    assert "lora" in done.stdout and "x baseline" in done.stdout


def test_a_failed_step_is_reported_with_its_error_and_the_check_goes_on(tmp_path: Path) -> None:
    broken = tmp_path / "tokenizer"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("not json")
    done, rows = gpu_check(
        *("--device", "cpu", "--tiny", "--tokenizer", str(broken)), json_path=tmp_path / "t.json"
    )
    assert done.returncode == 1
    assert rows["model"]["status"] == (
        f"FAILED: no usable tokenizer in {broken}: JSONDecodeError: Expecting value: line 1 "
        "column 1 (char 0)"
    )
    for name in ("baseline", "lora", "dora", "dpo"):
        assert rows[name]["status"] == "skipped: no model (its step did not succeed)"
    assert {rows[name]["status"] for name in GPU_STEPS} == {"skipped: no CUDA"}
    assert "no usable tokenizer" in done.stdout


def test_a_step_past_its_time_limit_is_stopped_and_failed(tmp_path: Path) -> None:
    check = Check("cpu", tmp_path, tiny=True)
    write_rows(check)
    row = run_child(STEPS_BY_NAME["model"], check, limit=1.0, env=NO_CUDA)
    assert row.status == "FAILED: stopped at its 1 s limit"
    assert row.seconds < 10
    assert not (tmp_path / "model" / "config.json").exists()
