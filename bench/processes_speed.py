"""One job in two processes against the same job in one, on this machine's CPU cores.

- 2 processes x 1 thread: `backprop train --nproc-per-node 2` (torchrun, gloo), each process
  one torch thread, each taking half of every step's rows;
- 1 process x 2 threads: `backprop train`, the whole batch in one process on two threads.

Same job both ways (the default model, examples/quickstart.jsonl, the same steps, batch, length
and seed, dropout off), so both train the same rows to the same loss history (printed, with the
largest relative difference). Reported: trained tokens per second of the training loop (the
run record's, loading aside) and the whole command's wall time (two processes each load the
model). Each variant in a fresh home, variants interleaved over the repeats, medians. A shared
2-core machine's step times drift by 10% and more between runs: compare within one run of this
script, and repeat it before concluding.

    .venv/bin/python bench/processes_speed.py [--steps 20] [--repeats 1]

Prints the machine and a table; writes bench/results/processes_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import described, speed_flags

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "processes_speed.json"
DATA = REPO / "examples" / "quickstart.jsonl"
BACKPROP = str(Path(sys.executable).parent / "backprop")
JOB = ["--batch-size", "4", "--max-length", "256", "--seed", "5", "--lora-dropout", "0"]
# name: (processes, torch threads per process)
VARIANTS = {"2 processes x 1 thread": (2, 1), "1 process x 2 threads": (1, 2)}


def run_variant(processes: int, threads: int, steps: int, home: Path) -> dict[str, object]:
    """`backprop train` in a fresh home; its record's speed and losses, and its wall time."""
    env = {
        **os.environ,
        "BACKPROPAGATE_HOME": str(home),
        "BACKPROPAGATE_TRAINER__THREADS": str(threads),
        # No speed probe in the timed command: both variants compute in fp32.
        "BACKPROPAGATE_TRAINER__CPU_DTYPE": "float32",
    }
    command = [BACKPROP, "train", "--data", str(DATA), "--steps", str(steps), *JOB]
    if processes > 1:
        command += ["--nproc-per-node", str(processes)]
    started = time.monotonic()
    subprocess.run(command, env=env, check=True, capture_output=True)
    wall = time.monotonic() - started
    [record_file] = (home / "artifacts" / "runs").glob("*/run.json")
    record = json.loads(record_file.read_text())
    return {
        "tokens_per_second": record["tokens_per_second"],
        "wall_seconds": wall,
        "loss_history": record["loss_history"],
        "processes": record.get("world_size", 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    runs: dict[str, list[dict[str, object]]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, (processes, threads) in VARIANTS.items():
            with tempfile.TemporaryDirectory(prefix="bp-bench-") as home:
                runs[name].append(run_variant(processes, threads, args.steps, Path(home)))

    def median(name: str, key: str) -> float:
        return statistics.median(float(run[key]) for run in runs[name])  # type: ignore[arg-type]

    two, one = VARIANTS
    first, second = (runs[name][0]["loss_history"] for name in VARIANTS)
    difference = max(
        abs(a - b) / abs(b)
        for a, b in zip(first, second, strict=True)  # type: ignore[call-overload]
    )
    summary = {
        "machine": described(),
        "speed_flags": speed_flags(),
        "steps": args.steps,
        "repeats": args.repeats,
        "job": JOB,
        "variants": {
            name: {
                "tokens_per_second": median(name, "tokens_per_second"),
                "wall_seconds": median(name, "wall_seconds"),
                "runs": runs[name],
            }
            for name in VARIANTS
        },
        "speedup": median(two, "tokens_per_second") / median(one, "tokens_per_second"),
        "largest_relative_loss_difference": difference,
    }
    print(summary["machine"])
    print(f"{'variant':<24} {'tokens/s':>10} {'wall s':>8}")
    for name in VARIANTS:
        print(
            f"{name:<24} {median(name, 'tokens_per_second'):>10.1f} "
            f"{median(name, 'wall_seconds'):>8.1f}"
        )
    print(
        f"2 processes / 1 process: {summary['speedup']:.2f}x tokens/s; loss histories agree "
        f"to {difference:.1e} relative"
    )
    from backpropagate_services.common.atomic import staged

    with staged(RESULTS) as partial:
        partial.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
