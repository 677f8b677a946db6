"""How fast each llama.cpp CPU variant runs on this machine: prompt and generation tokens/s.

The portable build ships one CPU backend per x86-64 feature level and, when llama_cpp is
imported, picks the best one this CPU supports (deploy/llama-cpp/cpu_variants.py). This measures
what that choice is worth against the baseline levels, on the same GGUFs, in the same run, each
variant in a fresh process (a process registers one backend). Prints a table of medians and
ratios to the x64 baseline.

    .venv/bin/python bench/llama_variants.py [--gguf FILE ...] [--repeats 3] [--threads 2]

Without --gguf it quantises the offline SmolLM2 to q8_0 and q4_k_m in a temporary directory.
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

PROMPT_TOKENS = 256
GENERATED_TOKENS = 64
LEVELS = ("x64", "sse42", "haswell", "skylakex", "icelake", "zen4", "sapphirerapids")


def measure(gguf: str, threads: int) -> dict[str, float]:
    """One measurement, in this process: prompt eval and greedy generation speed."""
    from backpropagate_services.export.llama_runtime import cpu_backend, open_gguf

    llm = open_gguf(Path(gguf), n_ctx=1024, threads=threads)
    prompt = [(7 * i) % 1000 + 100 for i in range(PROMPT_TOKENS)]
    started = time.perf_counter()
    llm.eval(prompt)
    prompt_seconds = time.perf_counter() - started
    token = llm.sample(temp=0.0)
    started = time.perf_counter()
    for _ in range(GENERATED_TOKENS):
        llm.eval([token])
        token = llm.sample(temp=0.0)
    generate_seconds = time.perf_counter() - started
    llm.close()
    return {
        "variant": cpu_backend().variant,  # type: ignore[dict-item]
        "prompt_tps": PROMPT_TOKENS / prompt_seconds,
        "generate_tps": GENERATED_TOKENS / generate_seconds,
    }


def run_variant(variant: str, gguf: str, threads: int) -> dict[str, float] | None:
    env = {**os.environ, "BACKPROPAGATE_EXPORT__LLAMA_CPU_VARIANT": variant}
    result = subprocess.run(
        [sys.executable, __file__, "--measure", gguf, "--threads", str(threads)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return None  # not supported by this CPU (or, for AMX, crashed: the reason it is left out)
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def default_ggufs(work: Path) -> list[Path]:
    from backpropagate_api.settings import get_settings
    from backpropagate_services.common.models import (
        OFFLINE_DEFAULT_ALIAS,
        hf_location,
        resolve_model,
    )
    from backpropagate_services.export.convert import convert_to_gguf
    from backpropagate_services.export.quantize import quantize_gguf

    hf_dir = Path(hf_location(resolve_model(OFFLINE_DEFAULT_ALIAS), get_settings().model_cache_dir))
    f16 = convert_to_gguf(hf_dir, work / "smollm2-f16.gguf", "f16")
    return [f16] + [quantize_gguf(f16, work / f"smollm2-{q}.gguf", q) for q in ("q8_0", "q4_k_m")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.threads)))
        return
    from backpropagate_services.common.hardware import cpu_name

    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores), {args.threads} threads")
    with tempfile.TemporaryDirectory() as tmp:
        ggufs = [Path(g) for g in args.gguf] or default_ggufs(Path(tmp))
        print(
            f"{'file':<22} {'variant':<15} {'prompt tok/s':>13} {'gen tok/s':>10} "
            f"{'prompt x':>9} {'gen x':>6}"
        )
        for gguf in ggufs:
            baseline: tuple[float, float] | None = None
            for variant in LEVELS:
                runs = [run_variant(variant, str(gguf), args.threads) for _ in range(args.repeats)]
                if any(run is None for run in runs):
                    print(f"{gguf.name:<22} {variant:<15} {'not supported or crashed':>13}")
                    continue
                prompt = statistics.median(run["prompt_tps"] for run in runs if run)
                generate = statistics.median(run["generate_tps"] for run in runs if run)
                baseline = baseline or (prompt, generate)
                print(
                    f"{gguf.name:<22} {variant:<15} {prompt:>13.1f} {generate:>10.1f} "
                    f"{prompt / baseline[0]:>8.2f}x {generate / baseline[1]:>5.2f}x"
                )


if __name__ == "__main__":
    main()
