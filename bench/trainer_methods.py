"""Speed and peak memory of every training method on SmolLM2-135M, as ratios to LoRA SFT
measured in the same run on this machine.

Each method trains a few steps in a fresh process (so its peak RSS is its own) with the
defaults a run gets here (the compute dtype `hardware.detect` picks, batch 4, max_length 512):
the SFT adapters on examples/quickstart.jsonl, DPO / ORPO / SimPO on examples/preference.jsonl,
KTO on examples/kto.jsonl. Tokens/s counts the tokens the loss is computed on (assistant
tokens; for preference methods the answer tokens of chosen and rejected); the first step is
left out (allocator warm-up). Prints the machine, a table, and writes
bench/results/trainer_methods.json.

    .venv/bin/python bench/trainer_methods.py [--steps 5] [--methods lora,dpo]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "trainer_methods.json"
# (name, method, adapter, dataset)
METHODS = [
    ("lora", "sft", "lora", "quickstart.jsonl"),
    ("dora", "sft", "dora", "quickstart.jsonl"),
    ("rslora", "sft", "rslora", "quickstart.jsonl"),
    ("full", "sft", "full", "quickstart.jsonl"),
    ("dpo", "dpo", "lora", "preference.jsonl"),
    ("orpo", "orpo", "lora", "preference.jsonl"),
    ("simpo", "simpo", "lora", "preference.jsonl"),
    ("kto", "kto", "lora", "kto.jsonl"),
]


def measure_one(name: str, steps: int) -> dict[str, object]:
    """Train `name` for `steps` steps in this process; its speed and this process's peak RSS."""
    from backpropagate_api.settings import get_settings
    from backpropagate_api.training import TrainingConfig
    from backpropagate_services.common.hardware import detect, peak_rss_bytes
    from backpropagate_services.common.models import (
        OFFLINE_DEFAULT_ALIAS,
        load_model,
        resolve_model,
    )
    from backpropagate_services.dataprep.formats import parse_jsonl
    from backpropagate_services.trainer.loop.preference import PreferenceTraining
    from backpropagate_services.trainer.loop.sft import LoraTraining, StepReport, TrainingHooks

    _, method, adapter, dataset = next(entry for entry in METHODS if entry[0] == name)
    hardware = detect()
    path = REPO / "examples" / dataset
    with path.open("rb") as lines:
        parsed = parse_jsonl(lines, path.name)
    model, tokenizer = load_model(
        resolve_model(OFFLINE_DEFAULT_ALIAS),
        get_settings().model_cache_dir,
        hardware.device,
        hardware.compute_dtype,
    )
    config = TrainingConfig(
        steps=steps,
        method=method,
        adapter=adapter,
        learning_rate=1e-4 if adapter == "full" else 2e-4,
    )
    training = (
        PreferenceTraining(model, tokenizer, parsed.preference_rows, config)
        if method != "sft"
        else LoraTraining(model, tokenizer, parsed.conversations, config)
    )

    class Timed(TrainingHooks):
        def __init__(self) -> None:
            self.started = 0.0
            self.seconds: list[float] = []
            self.tokens: list[float] = []

        def before_step(self, step: int, run: LoraTraining) -> None:
            self.started = time.perf_counter()

        def after_step(self, report: StepReport, run: LoraTraining) -> None:
            seconds = time.perf_counter() - self.started
            self.seconds.append(seconds)
            self.tokens.append(report.tokens_per_second * seconds)

    hooks = Timed()
    training.run(hooks)
    seconds, tokens = sum(hooks.seconds[1:]), sum(hooks.tokens[1:])
    return {
        "method": name,
        "dtype": hardware.compute_dtype,
        "step_seconds_median": statistics.median(hooks.seconds[1:]),
        "tokens_per_second": tokens / seconds,
        "trainable_parameters": sum(p.numel() for p in training.trainable),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--methods", default=",".join(entry[0] for entry in METHODS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one method
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, args.steps)))
        return
    from backpropagate_services.common.hardware import cpu_name

    results = []
    for name in args.methods.split(","):
        child = subprocess.run(
            [sys.executable, __file__, "--one", name, "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(f"measured {name}", file=sys.stderr)
    baseline = next((r for r in results if r["method"] == "lora"), results[0])
    print(f"machine: {cpu_name()}; {args.steps} steps each, first left out")
    header = ("method", "dtype", "tokens/s", "x lora", "s/step", "peak RSS", "x lora")
    print("{:8} {:9} {:>9} {:>7} {:>7} {:>9} {:>7}".format(*header))
    for r in results:
        print(
            f"{r['method']:8} {r['dtype']:9} {r['tokens_per_second']:9.0f} "
            f"{r['tokens_per_second'] / baseline['tokens_per_second']:7.2f} "
            f"{r['step_seconds_median']:7.2f} {r['peak_rss_bytes'] / 2**30:8.2f}G "
            f"{r['peak_rss_bytes'] / baseline['peak_rss_bytes']:7.2f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": cpu_name(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
