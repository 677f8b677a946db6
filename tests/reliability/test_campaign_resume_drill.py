"""Drill: a `backprop multi-run` killed with SIGKILL in its second run of three is finished by
`backprop runs resume CAMPAIGN`, and ends with the merged adapter of a campaign that never
stopped (same data, same seeds).

Every command is a real `backprop` process on one home directory. The kill lands after a
checkpoint of run 2, where the run holds until killed: run 1 must not train again, run 2 must go
on from its checkpoint, run 3 must start from the merge of runs 1 and 2 as the uninterrupted
campaign's did.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from cli_drills import (
    BACKPROP,
    backprop,
    checkpointed_runs,
    holding_at,
    run_record,
    stop_once_checkpointed,
)

from backpropagate_services.trainer.adapters.factors import read_adapter_dir

pytestmark = [pytest.mark.model]

STEPS = 6
CAMPAIGN_ARGS = [
    *("--runs", "3", "--samples", "3", "--steps", str(STEPS), "--batch-size", "2"),
    *("--max-length", "64", "--checkpoint-every", "2", "--learning-rate", "1e-3"),
]


def in_run(run: int):
    return lambda record: record.get("campaign_run") == run


def test_a_campaign_killed_in_its_second_run_resumes_to_the_same_merged_adapter(
    home_env: dict[str, str], quickstart: Path
) -> None:
    home = Path(home_env["BACKPROPAGATE_HOME"])
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    command = [BACKPROP, "multi-run", "--data", str(quickstart), *CAMPAIGN_ARGS]

    # Held after run 2's first checkpoint (job step STEPS + 3), so the kill finds it there.
    held = subprocess.Popen(command, env=holding_at(home_env, STEPS + 3), **quiet)
    stop_once_checkpointed(held, home, 2, signal.SIGKILL, in_run(2))
    [second] = checkpointed_runs(home, 2, in_run(2))
    killed_second = run_record(home_env, second)
    assert killed_second["last_checkpoint_step"] == len(killed_second["loss_history"]) == 2
    campaign_id = killed_second["campaign_id"]
    killed = run_record(home_env, campaign_id)
    assert killed["status"] == "JOB_STATUS_RUNNING"
    assert len(killed["campaign"]["timeline"]) == 1  # run 1 merged, run 2 not yet

    resumed_output = backprop(home_env, "runs", "resume", second)  # a run resumes its campaign
    assert "succeeded" in resumed_output

    resumed = run_record(home_env, campaign_id)
    assert resumed["status"] == "JOB_STATUS_SUCCEEDED"
    assert resumed["attempts"] == 2
    first, second_id, third = resumed["campaign"]["run_ids"]
    assert second_id == second
    assert [point["run"] for point in resumed["campaign"]["timeline"]] == [1, 2, 3]
    assert run_record(home_env, first)["attempts"] == 1  # not trained again
    second_run = run_record(home_env, second)
    assert second_run["attempts"] == 2
    assert second_run["resumed_from_step"] >= 2
    assert len(second_run["loss_history"]) == STEPS
    assert run_record(home_env, third)["attempts"] == 1
    shown = backprop(home_env, "runs", "show", campaign_id)  # the timeline, for people
    assert "merge timeline (slao)" in shown
    assert all(weight in shown for weight in ("1.000", "0.707", "0.577"))  # 1 / sqrt(run)

    whole = json.loads(
        backprop(home_env, "multi-run", "--data", str(quickstart), *CAMPAIGN_ARGS, "--json")
    )
    assert whole["status"] == "JOB_STATUS_SUCCEEDED"
    assert [p["merge_weight"] for p in whole["campaign"]["timeline"]] == pytest.approx(
        [p["merge_weight"] for p in resumed["campaign"]["timeline"]]
    )
    resumed_adapter = read_adapter_dir(home / "artifacts" / "runs" / campaign_id / "adapter")
    whole_adapter = read_adapter_dir(home / "artifacts" / "runs" / whole["run_id"] / "adapter")
    assert set(resumed_adapter) == set(whole_adapter)
    for name, layer in resumed_adapter.items():
        assert torch.allclose(layer.a, whole_adapter[name].a, atol=1e-5), name
        assert torch.allclose(layer.b, whole_adapter[name].b, atol=1e-5), name
    # And the difference is not vacuous: the merged update is far from zero.
    assert max(float(layer.b.abs().max()) for layer in whole_adapter.values()) > 1e-3


def test_a_campaign_larger_than_its_data_is_refused_with_a_hint(
    home_env: dict[str, str], quickstart: Path
) -> None:
    done = subprocess.run(
        [BACKPROP, "multi-run", "--data", str(quickstart), "--runs", "4", "--samples", "3"],
        env=home_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert "INPUT_CONFIG_INVALID" in done.stderr
    assert "need 12 distinct rows; the dataset has 10" in done.stderr
    assert "--with-replacement" in done.stderr
    assert "Traceback" not in done.stderr
