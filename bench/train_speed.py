"""Training speed against what users run instead: a tutorial-style transformers `Trainer` + peft
LoRA, padding each batch to its longest row, on the same rows with the same hyperparameters.

LoRA SFT of SmolLM2-135M (LoRA r=16, alpha 32 on every linear layer, batch 8, max_length 256) on
a generated chat set with a long-tailed length mix (lognormal answer lengths, a few near the
limit, as real chat data has). Variants, each in a fresh process so that its peak RSS is its own:

- baseline: `transformers.Trainer` + `peft.get_peft_model`, a collator padding to the longest row
  of each batch (labels -100 on prompts and padding), the Trainer's own loop;
- ours-padded: our loop (services/trainer/loop/sft.py) with packing off;
- ours: our loop as runs get it (packing on where the model honours position resets);
- with --levers, "ours" with one lever changed (LEVERS): what each gives on this machine. A
  lever that cannot run here (torch.compile without a compiler) is reported as failed.

Every variant runs in fp32 and in bf16 (--dtypes), whatever this CPU is: whether bf16 pays off
is a property of the machine (AVX-512 BF16 is fast on a Zen 4 EPYC, half fp32's speed on a Xeon
without AMX), and the table shows it beside the trainer's dtype probe's verdict for this machine.
"x base" compares with the baseline in the same dtype, "x fp32" with the same variant in fp32.

Useful tokens are the real (non-padding) tokens a step processes; the first steps are warm-up
and left out. MFU = useful tokens/s x FLOPs per token / the matmul throughput this script
measures first, in the variant's dtype, with the threads training uses. FLOPs per
token: 4 x the base model's parameters (a forward pass, and the backward pass through frozen
weights to the adapters; LoRA's own and attention's FLOPs left out, so MFU is a lower bound).

    .venv/bin/python bench/train_speed.py [--steps 12] [--warmup 3] [--repeats 2] [--levers]
        [--dtypes float32,bfloat16]

Prints the machine (CPU model and flags), the dtype probe's verdict, a table of medians over
repeats, and writes bench/results/train_speed.json and train_speed.png.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
VARIANTS = ("baseline", "ours-padded", "ours")
DTYPES = ("float32", "bfloat16")
# Levers tried on top of "ours", one at a time (--levers): what each gives on this machine.
LEVERS = {
    "ours+peft-dropout": "peft's own LoRA dropout: a mask per adapted layer, not per input",
    "ours+checkpointing": "gradient checkpointing: activations recomputed in the backward pass",
    "ours+compile": "torch.compile of the model (dynamic shapes)",
    "ours+1-thread": "one torch thread instead of one per core",
}
BATCH, MAX_LENGTH, LORA_R, LORA_ALPHA, LEARNING_RATE = 8, 256, 16, 32, 2e-4
# Filler words: any text does for timing; these tokenise to one or two tokens each.
WORDS = [
    *("the", "a", "model", "data", "train", "river", "stone", "cloud", "apple", "north"),
    *("quiet", "bright", "seven", "garden", "paper", "answer", "question", "because"),
    *("value", "system", "token", "light", "water", "music", "number", "table", "window"),
]


def conversations(count: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Chat rows whose answer lengths are lognormal (median about 20 words, a tail past 150)."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        words = min(int(rng.lognormvariate(3.0, 1.0)) + 3, 220)
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 25)))
        answer = " ".join(rng.choice(WORDS) for _ in range(words))
        rows.append(
            [
                {"role": "user", "content": f"Question {index}: {question}?"},
                {"role": "assistant", "content": answer},
            ]
        )
    return rows


def matmul_peak(dtype_name: str, seconds: float = 2.0) -> float:
    """FLOP/s of square matmuls in `dtype_name` on this process's threads."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    for _ in range(3):
        a @ b
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        runs += 1
    return 2 * 1024**3 * runs / (time.perf_counter() - started)


def measure(variant: str, dtype: str, steps: int, warmup: int) -> dict[str, Any]:
    """Train `variant` in `dtype` for `steps` steps in this process: step times, useful tokens,
    peak RSS."""
    import torch

    from backpropagate_api.settings import get_settings
    from backpropagate_api.training import TrainingConfig
    from backpropagate_services.common.hardware import detect, peak_rss_bytes
    from backpropagate_services.common.models import (
        OFFLINE_DEFAULT_ALIAS,
        load_model,
        resolve_model,
    )

    if variant == "ours+1-thread":
        torch.set_num_threads(1)
    if variant == "ours+peft-dropout":
        from backpropagate_services.trainer.adapters import lora

        lora.share_lora_dropout = lambda model: None  # type: ignore[assignment]
    hardware = detect(dtype)
    model, tokenizer = load_model(
        resolve_model(OFFLINE_DEFAULT_ALIAS),
        get_settings().model_cache_dir,
        hardware.device,
        hardware.compute_dtype,
    )
    base_parameters = model.num_parameters()
    rows = conversations(BATCH * steps)
    config = TrainingConfig(
        steps=steps,
        batch_size=BATCH,
        gradient_accumulation=1,
        max_length=MAX_LENGTH,
        lora_r=LORA_R,
        lora_alpha=LORA_ALPHA,
        learning_rate=LEARNING_RATE,
        eval_split=0.0,
    )
    step_seconds, step_tokens = (
        baseline_steps(model, tokenizer, rows, config)
        if variant == "baseline"
        else our_steps(model, tokenizer, rows, config, variant)
    )
    seconds, tokens = sum(step_seconds[warmup:]), sum(step_tokens[warmup:])
    return {
        "variant": variant,
        "dtype": hardware.compute_dtype,
        "threads": torch.get_num_threads(),
        "useful_tokens_per_second": tokens / seconds,
        "step_seconds_median": statistics.median(step_seconds[warmup:]),
        "peak_rss_bytes": peak_rss_bytes(),
        "flops_per_token": 4 * base_parameters,
    }


def our_steps(
    model: Any, tokenizer: Any, rows: list, config: Any, variant: str
) -> tuple[list[float], list[int]]:
    from backpropagate_services.trainer.loop.sft import LoraTraining, TrainingHooks

    training = LoraTraining(model, tokenizer, rows, config, packing=variant != "ours-padded")
    if variant == "ours+checkpointing":
        training.model.gradient_checkpointing_enable({"use_reentrant": False})
    if variant == "ours+compile":
        training.model.compile(dynamic=True)
    seconds: list[float] = []
    tokens: list[int] = []

    class Timed(TrainingHooks):
        def before_step(self, step: int, run: LoraTraining) -> None:
            self.started = time.perf_counter()

        def after_step(self, report: Any, run: LoraTraining) -> None:
            seconds.append(time.perf_counter() - self.started)

    real = [len(example.input_ids) for example in training.dataset.examples]
    original_step = training._step

    def counted_step(step: int, indices: list[int]) -> tuple[float, int, float]:
        tokens.append(sum(real[i] for i in indices))
        return original_step(step, indices)

    training._step = counted_step  # type: ignore[method-assign]
    training.run(Timed())
    return seconds, tokens


def baseline_steps(
    model: Any, tokenizer: Any, rows: list, config: Any
) -> tuple[list[float], list[int]]:
    """The tutorial recipe: peft's get_peft_model, Trainer, a pad-to-longest collator."""
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from backpropagate_services.trainer.data.templating import IGNORE_INDEX, tokenize_conversations

    examples = tokenize_conversations(rows, tokenizer, config.max_length).examples
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    pad_id = tokenizer.pad_token_id or 0
    tokens: list[int] = []

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(row["input_ids"]) for row in batch)
        tokens.append(sum(len(row["input_ids"]) for row in batch))
        pad = [longest - len(row["input_ids"]) for row in batch]
        return {
            "input_ids": torch.tensor(
                [r["input_ids"] + [pad_id] * p for r, p in zip(batch, pad, strict=True)]
            ),
            "attention_mask": torch.tensor(
                [[1] * len(r["input_ids"]) + [0] * p for r, p in zip(batch, pad, strict=True)]
            ),
            "labels": torch.tensor(
                [r["labels"] + [IGNORE_INDEX] * p for r, p in zip(batch, pad, strict=True)]
            ),
        }

    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    seconds: list[float] = []
    on_gpu = next(model.parameters()).device.type == "cuda"  # bench/gpu_check.py runs it there

    class Timed(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            if on_gpu:  # a step's kernels run after it returns: time them, not their launch
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - self.started)

    with tempfile.TemporaryDirectory() as output:
        arguments = TrainingArguments(
            output_dir=output,
            per_device_train_batch_size=config.batch_size,
            max_steps=config.steps,
            learning_rate=config.learning_rate,
            warmup_steps=config.warmup_ratio,  # below 1: a ratio of the steps
            lr_scheduler_type="linear",
            logging_steps=10_000,
            save_strategy="no",
            report_to=[],
            remove_unused_columns=False,
            dataloader_num_workers=0,
            use_cpu=not on_gpu,
            bf16=str(next(model.parameters()).dtype) == "torch.bfloat16",
        )
        Trainer(
            model=peft_model,
            args=arguments,
            train_dataset=dataset,
            data_collator=collate,
            callbacks=[Timed()],
        ).train()
    return seconds, tokens[: len(seconds)]


def chart(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    names = [f"{r['variant']} {r['dtype']}" for r in results]
    axes[0].bar(names, [r["useful_tokens_per_second"] for r in results], color="#4c72b0")
    axes[0].set_title("useful tokens / s (higher is better)")
    axes[1].bar(names, [r["peak_rss_bytes"] / 2**30 for r in results], color="#dd8452")
    axes[1].set_title("peak RSS, GiB (lower is better)")
    for axis in axes:
        axis.tick_params(axis="x", labelrotation=35)
    figure.tight_layout()
    partial = path.with_suffix(".partial.png")
    figure.savefig(partial, dpi=120)
    partial.replace(path)


def measured_runs(
    variants: list[str], dtypes: list[str], args: argparse.Namespace
) -> tuple[dict[tuple[str, str], list[dict[str, Any]]], dict[str, str]]:
    """Each (variant, dtype) measured `args.repeats` times, each time in a fresh process; a
    lever that fails or hangs here is reported, not fatal."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    failed: dict[str, str] = {}
    for repeat in range(args.repeats):
        for dtype in dtypes:
            for variant in variants:
                name = f"{variant} {dtype}"
                if name in failed:
                    continue
                argv = [
                    *(sys.executable, __file__, "--one", variant, "--dtypes", dtype),
                    *("--steps", str(args.steps), "--warmup", str(args.warmup)),
                ]
                if variant not in LEVERS:
                    child = subprocess.run(argv, capture_output=True, text=True, check=True)
                else:
                    try:
                        child = subprocess.run(argv, capture_output=True, text=True, timeout=900)
                        if child.returncode:
                            failed[name] = child.stderr.strip().splitlines()[-1][:200]
                    except subprocess.TimeoutExpired:
                        failed[name] = "took over 15 minutes"
                    if name in failed:
                        print(f"{name} failed: {failed[name]}", file=sys.stderr)
                        continue
                result = json.loads(child.stdout.strip().splitlines()[-1])
                runs.setdefault((variant, dtype), []).append(result)
                print(f"measured {name} (repeat {repeat + 1})", file=sys.stderr)
    return runs, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--levers", action="store_true", help="also: " + "; ".join(LEVERS.values()))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one variant
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.dtypes, args.steps, args.warmup)))
        return
    from machine import described, dtype_verdict, speed_flags

    from backpropagate_services.common.hardware import cpu_name

    dtypes = args.dtypes.split(",")
    verdict = dtype_verdict()
    peaks = {dtype: matmul_peak(dtype) for dtype in dtypes}
    variants = args.variants.split(",") + (list(LEVERS) if args.levers else [])
    runs, failed = measured_runs(variants, dtypes, args)
    results = []
    for measured in runs.values():
        median = {
            key: statistics.median(run[key] for run in measured)
            for key in ("useful_tokens_per_second", "step_seconds_median", "peak_rss_bytes")
        }
        results.append({**measured[0], **median, "repeats": len(measured)})
    by_name = {(r["variant"], r["dtype"]): r for r in results}
    print(f"machine: {described()}")
    print(
        "matmul peak: "
        + ", ".join(f"{dtype} {peaks[dtype] / 1e9:.1f} GFLOP/s" for dtype in dtypes)
        + f"; dtype probe: {verdict['dtype']}, {verdict['reason']}"
    )
    print(f"{args.steps} steps of {BATCH} rows, {args.warmup} left out; medians of {args.repeats}")
    header = ("variant", "dtype", "tokens/s", "x base", "x fp32", "MFU", "s/step", "RSS", "x base")
    print("{:18} {:9} {:>9} {:>7} {:>7} {:>6} {:>7} {:>9} {:>7}".format(*header))
    for r in results:
        baseline = by_name.get(("baseline", r["dtype"]), r)
        fp32 = by_name.get((r["variant"], "float32"), r)
        r["speed_ratio"] = r["useful_tokens_per_second"] / baseline["useful_tokens_per_second"]
        r["fp32_ratio"] = r["useful_tokens_per_second"] / fp32["useful_tokens_per_second"]
        r["rss_ratio"] = r["peak_rss_bytes"] / baseline["peak_rss_bytes"]
        r["mfu"] = r["useful_tokens_per_second"] * r["flops_per_token"] / peaks[r["dtype"]]
        print(
            f"{r['variant']:18} {r['dtype']:9} {r['useful_tokens_per_second']:9.0f} "
            f"{r['speed_ratio']:7.2f} {r['fp32_ratio']:7.2f} {r['mfu']:6.1%} "
            f"{r['step_seconds_median']:7.2f} {r['peak_rss_bytes'] / 2**30:8.2f}G "
            f"{r['rss_ratio']:7.2f}"
        )
    for name, why in failed.items():
        print(f"{name:28} failed: {why}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {
        "machine": cpu_name(),
        "cpu_flags": speed_flags(),
        "dtype_probe": verdict,
        "matmul_peak_flops": peaks,
        "steps": args.steps,
        "warmup": args.warmup,
        "results": results,
        "failed": failed,
    }
    (RESULTS / "train_speed.json").write_text(json.dumps(summary, indent=2) + "\n")
    chart(results, RESULTS / "train_speed.png")


if __name__ == "__main__":
    main()
