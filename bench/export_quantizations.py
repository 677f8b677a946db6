"""Every export quantisation of SmolLM2, through the real pipeline: agreement, KL, size, time,
and the time of each stage (merge, convert, quantize, verify, smoke).

Fine-tunes nothing: a small random LoRA adapter (r=8, lora_B ~ N(0, 0.01)) stands in for a
trained one, so the merge is real and the figures describe what a user's export gets. Prints a
table and writes bench/results/export_quantizations.json.

    .venv/bin/python bench/export_quantizations.py [--quantization q8_0 ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

QUANTIZATIONS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
RESULTS = Path(__file__).resolve().parent / "results" / "export_quantizations.json"


def gentle_adapter(base_dir: Path, out_dir: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    peft_model.save_pretrained(out_dir)
    return out_dir


def stage_durations(starts: list[tuple[str, float]], ended: float) -> dict[str, float]:
    """Seconds in each stage: from its start to the next one's (the last one's to `ended`)."""
    ends = [at for _, at in starts[1:]] + [ended]
    return {stage: round(end - at, 1) for (stage, at), end in zip(starts, ends, strict=True)}


def main() -> None:
    from backpropagate_api.settings import ExportSettings, get_settings
    from backpropagate_services.common.hardware import cpu_name
    from backpropagate_services.common.models import (
        OFFLINE_DEFAULT_ALIAS,
        hf_location,
        resolve_model,
    )
    from backpropagate_services.export.llama_runtime import cpu_backend
    from backpropagate_services.export.pipeline import export_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantization", action="append", default=[])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    base = resolve_model(OFFLINE_DEFAULT_ALIAS)
    cache = get_settings().model_cache_dir
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        adapter = gentle_adapter(Path(hf_location(base, cache)), Path(tmp) / "adapter")
        for quantization in args.quantization or QUANTIZATIONS:
            work = Path(tmp) / quantization
            started = time.monotonic()
            stage_starts: list[tuple[str, float]] = []
            outcome = export_model(
                base,
                adapter,
                work,
                export_format="gguf",
                quantization=quantization,
                prompt="What is the capital of France? Answer in one sentence.",
                cache_dir=cache,
                settings=ExportSettings(threads=args.threads),
                on_stage=lambda stage, *_, starts=stage_starts: starts.append(
                    (stage, time.monotonic())
                ),
            )
            verification = outcome.verification
            assert verification is not None
            row = {
                "quantization": quantization,
                "size_mib": round(outcome.main_file.stat().st_size / 2**20, 1),
                "top1_decisive": round(verification.top1_agreement, 4),
                "top1_all": round(verification.top1_agreement_all, 4),
                "mean_kl": verification.mean_kl,
                "perplexity_gguf": round(verification.perplexity_gguf, 3),
                "perplexity_torch": round(verification.perplexity_reference, 3),
                "passed": verification.passed,
                "warning": bool(verification.warning),
                "seconds": round(time.monotonic() - started, 1),
                "stage_seconds": stage_durations(stage_starts, time.monotonic()),
                "answer": outcome.smoke_answer,
            }
            rows.append(row)
            outcome.main_file.unlink()
    cpu = cpu_name()
    print(f"CPU: {cpu} ({os.cpu_count()} cores); llama.cpp backend: {cpu_backend().variant}")
    stages = list(rows[0]["stage_seconds"])
    print(
        "| quant | size MiB | top-1 (decisive) | top-1 (all) | mean KL | ppl gguf/torch | time s | "
        + " | ".join(f"{stage} s" for stage in stages)
        + " |"
    )
    print("|---" * (7 + len(stages)) + "|")
    for row in rows:
        print(
            f"| {row['quantization']} | {row['size_mib']} | {row['top1_decisive']:.1%} | "
            f"{row['top1_all']:.1%} | {row['mean_kl']:.5f} | "
            f"{row['perplexity_gguf']}/{row['perplexity_torch']} | {row['seconds']} | "
            + " | ".join(str(row["stage_seconds"].get(stage, "-")) for stage in stages)
            + " |"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
