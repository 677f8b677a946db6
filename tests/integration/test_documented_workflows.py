"""The product documentation's workflow on the real model, as a user in a CI job runs it:
`backprop train --output-dir ./output` with output that is no terminal, then `backprop export
./output/lora`.

The log shows the run id the moment the run is queued, and a progress line at every interval
while the run is held before a step (a slow step, to a watchdog); the adapter lands in
./output/lora, and exporting that directory gives a verified GGUF.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cli_process import BACKPROP, backprop, user_environment

pytestmark = [pytest.mark.model, pytest.mark.llama]

RUN_ID = re.compile(r"run (run-\d{8}T\d{6}-[0-9a-f]+): queued")


class Lines:
    """A process's stderr, line by line as it comes, kept with the time each arrived."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._reader.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 240) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for _, line in self.lines if re.search(pattern, line)]
            if len(found) >= count:
                return found
            time.sleep(0.1)
        raise AssertionError(f"no {count} lines like {pattern!r}: {self.text()[-3000:]}")

    def finish(self) -> None:
        """Every line, once the process has ended."""
        self._reader.join(timeout=30)

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def test_a_headless_train_logs_as_it_goes_and_its_output_dir_adapter_exports(
    tmp_path: Path, quickstart: Path, model_cache: Path
) -> None:
    release = tmp_path / "release-the-hold"
    env = user_environment(tmp_path) | {
        "BACKPROPAGATE_MODEL_CACHE": str(model_cache),
        "BACKPROPAGATE_PROGRESS_INTERVAL_SECONDS": "1",
        "BACKPROPAGATE_FAULT__HOLD_AT_STEP": "2",  # a step that takes as long as the test says
        "BACKPROPAGATE_FAULT__HOLD_RELEASE_FILE": str(release),
    }
    command = [str(BACKPROP), "train", "--data", str(quickstart), "--steps", "2"]
    train = subprocess.Popen(
        [*command, "--output-dir", "output"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stderr = Lines(train)
        [queued] = stderr.wait_for(RUN_ID.pattern)
        run_id = RUN_ID.search(queued)[1]  # type: ignore[index]
        # Held before step 2: step 1's line comes again at every interval, nothing else happens.
        held = stderr.wait_for(rf"run {run_id}: step 1/2 .*s elapsed\)", count=3)
        release.touch()
        train.wait(timeout=300)
        stderr.finish()
        stdout = train.stdout.read() if train.stdout else ""
    finally:
        train.kill()

    assert train.returncode == 0, stderr.text()[-3000:]
    assert len(held) >= 3
    assert f"run {run_id}: ended" in stderr.text()
    adapter = tmp_path / "output" / "lora"
    assert (adapter / "adapter_config.json").is_file()
    assert "adapter saved: output/lora" in stdout

    exported = backprop(
        tmp_path,
        "export",
        "./output/lora",
        "--quantization",
        "f16",
        "--output-dir",
        "gguf",
        env={"BACKPROPAGATE_MODEL_CACHE": str(model_cache)},
        timeout=600,
    )

    assert exported.exit_code == 0, exported.stderr[-3000:]
    assert [path.suffix for path in (tmp_path / "gguf").iterdir()] == [".gguf"]
