"""The log settings as the product documents them: BACKPROPAGATE_LOG_LEVEL in any case,
BACKPROPAGATE_LOG_JSON lines that carry the run id, BACKPROPAGATE_LOG_FILE getting every line.

A real `backprop train` in the embedded default, on a model directory that is no model: the run
is queued, its worker logs under its id and fails, in a few seconds and without loading weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cli_process import backprop


def test_log_level_json_and_file_settings_reach_the_services_log(
    tmp_path: Path, quickstart: Path
) -> None:
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text('{"model_type": "llama"}')
    log_file = tmp_path / "logs" / "backpropagate.jsonl"

    outcome = backprop(
        tmp_path,
        "train",
        "--data",
        str(quickstart),
        "--model",
        str(not_a_model),
        "--steps",
        "1",
        env={
            "BACKPROPAGATE_LOG_LEVEL": "debug",
            "BACKPROPAGATE_LOG_JSON": "true",
            "BACKPROPAGATE_LOG_FILE": str(log_file),
        },
    )

    assert "Traceback" not in outcome.stderr, outcome.stderr
    # Files that are no model are the model's failure, not a bug (INTERNAL).
    assert "error DEP_MODEL_LOAD_FAILED:" in outcome.stderr
    run_id = re.search(r"run (run-\d{8}T\d{6}-[0-9a-f]+)", outcome.stderr)
    assert run_id, outcome.stderr
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert {"DEBUG", "INFO"} <= {line["level"] for line in lines}
    assert any(line["run_id"] == run_id[1] for line in lines)
    # The file mirrors the embedded default's own log, line for line.
    embedded_log = tmp_path / "state" / "logs" / "embedded.log"
    assert embedded_log.read_text().splitlines() == log_file.read_text().splitlines()
