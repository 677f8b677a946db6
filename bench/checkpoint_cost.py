"""What a checkpoint costs on SmolLM2-135M with the default LoRA settings: size, time to write
and to read back, as a ratio to the time of one training step measured in the same run.

Trains the real model (the default config: r=16 on every linear layer, batch 4, max_length 512)
on examples/quickstart.jsonl for a few steps, writes a checkpoint after each through the real
CheckpointManager into a local store, and loads the last one back. Prints the machine, a table,
and writes bench/results/checkpoint_cost.json.

    .venv/bin/python bench/checkpoint_cost.py [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "checkpoint_cost.json"


def main() -> None:
    import torch

    from backpropagate_api.settings import get_settings
    from backpropagate_api.training import TrainingConfig
    from backpropagate_services.common.hardware import cpu_name
    from backpropagate_services.common.models import (
        OFFLINE_DEFAULT_ALIAS,
        load_model,
        resolve_model,
    )
    from backpropagate_services.common.store.local import LocalDirStore
    from backpropagate_services.dataprep.formats import parse_jsonl
    from backpropagate_services.trainer.loop.checkpoints import CheckpointManager, CheckpointPolicy
    from backpropagate_services.trainer.loop.sft import LoraTraining, StepReport, TrainingHooks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    quickstart = REPO / "examples" / "quickstart.jsonl"
    with quickstart.open("rb") as lines:
        conversations = parse_jsonl(lines, quickstart.name).conversations
    model, tokenizer = load_model(
        resolve_model(OFFLINE_DEFAULT_ALIAS), get_settings().model_cache_dir, "cpu"
    )

    class TimedHooks(TrainingHooks):
        def __init__(self, manager: CheckpointManager) -> None:
            self.manager = manager
            self.step_started = time.perf_counter()
            self.step_seconds: list[float] = []
            self.save_seconds: list[float] = []
            self.sizes: list[int] = []
            self.last_key = ""

        def before_step(self, step: int, training: LoraTraining) -> None:
            self.step_started = time.perf_counter()

        def after_step(self, report: StepReport, training: LoraTraining) -> None:
            self.step_seconds.append(time.perf_counter() - self.step_started)
            started = time.perf_counter()
            info = self.manager.save(training.state(), attempt=1)
            self.save_seconds.append(time.perf_counter() - started)
            self.sizes.append(info.size_bytes)
            self.last_key = info.key

    with tempfile.TemporaryDirectory() as tmp:
        manager = CheckpointManager(LocalDirStore(Path(tmp)), "bench", CheckpointPolicy())
        hooks = TimedHooks(manager)
        config = TrainingConfig(steps=args.steps)
        LoraTraining(model, tokenizer, conversations, config).run(hooks)
        started = time.perf_counter()
        manager.load(hooks.last_key)
        load_seconds = time.perf_counter() - started

    step = statistics.median(hooks.step_seconds[1:])  # the first step warms up allocators
    save = statistics.median(hooks.save_seconds)
    result = {
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads()},
        "config": {"steps": args.steps, "batch_size": config.batch_size, "lora_r": config.lora_r},
        "checkpoint_mb": hooks.sizes[-1] / 1e6,
        "save_seconds_median": save,
        "load_seconds": load_seconds,
        "step_seconds_median": step,
        "save_to_step_ratio": save / step,
    }
    print(f"machine: {result['machine']['cpu']}, {result['machine']['threads']} torch threads")
    print(f"checkpoint: {result['checkpoint_mb']:.1f} MB (adapter + AdamW state + RNG + order)")
    print(f"write: {save:.2f} s median; read back: {load_seconds:.2f} s")
    print(f"one training step: {step:.2f} s median; write / step = {save / step:.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
