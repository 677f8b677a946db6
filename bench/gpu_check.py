"""The GPU check (`make gpu-check`, docs/gpu.md): the product trained for real on the hardware
users have, and one table of what it measured.

The steps (bench/gpu_steps.py), each through the product's own code: a random ~1B Llama
(TinyLlama-1.1B's shape) built from a config and saved with SmolLM2's tokenizer; the tutorial
transformers `Trainer` + peft baseline on it; LoRA SFT in bf16; LoRA SFT of SmolLM2-135M (where
its GGUF came along); QLoRA on an NF4 base (bitsandbytes); DoRA; LoRA with FP8 compute (compute
capability 8.9+); DPO; a real CUDA out-of-memory error recovered by halving the micro-batch; the
safety service's NVML readings. Each row: tokens/s, x the baseline, peak VRAM against the
trainer's estimate, seconds.

Each step runs in a process of its own with a time limit of its own, so its peak memory is its
own and a crash, a hang or a CUDA error ends that step alone (FAILED, with its error); a step
that would start with too little of --budget left is skipped, so the whole check stays under 8
minutes on an H100. Without CUDA every step reports "skipped: no CUDA" (the dry run `make
gpu-check` is here); `--device cpu --tiny` runs the steps a CPU can take (the model, the
baseline, LoRA, DoRA, DPO) on a model of a few million parameters for a few steps.

On a GPU machine with PyTorch and nothing of ours installed, from the checkout, with the folder
`make gpu-wheels` wrote where pip works:

    python3 bench/gpu_check.py --wheels .whl --json docs/gpu-check.json

Exits 1 when a step FAILED, else 0.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpu_carry import TOKENIZER_FOLDER, install_wheels, link_our_packages
from gpu_steps import STEPS, STEPS_BY_NAME, TINY_LIMIT_SECONDS, Check, Step, run_step, write_rows

BENCH = Path(__file__).resolve().parent
DEFAULT_BUDGET_SECONDS = 450.0  # under 8 minutes with the interpreter's start and the table
MIN_STEP_SECONDS = 30.0  # a step given less is skipped: it could not load a model in time
# The packages whose versions decide what the steps can do, named in the table's header.
VERSIONS = ("torch", "transformers", "peft", "trl", "torchao", "bitsandbytes")


@dataclass
class Row:
    """One step's line of the table (and of the JSON)."""

    name: str
    title: str
    status: str
    seconds: float = 0.0
    tokens_per_second: float | None = None
    vs_baseline: float | None = None
    peak_bytes: int | None = None
    estimate_bytes: int | None = None
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def peak_over_estimate(self) -> float | None:
        if self.peak_bytes and self.estimate_bytes:
            return self.peak_bytes / self.estimate_bytes
        return None


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def why_not_run(step: Step, check: Check, cuda: bool, done: dict[str, Row]) -> str | None:
    """Why `step` is skipped here, before it starts; None: it runs."""
    on_gpu = check.device == "cuda" and cuda
    if not on_gpu and not (check.tiny and step.on_cpu):
        return "no CUDA"
    if step.needs_model and not done["model"].ok:
        return "no model (its step did not succeed)"
    return None


def run_child(step: Step, check: Check, limit: float, env: dict[str, str]) -> Row:
    """`step` in a process of its own (this script, --step), killed after `limit` seconds."""
    result = check.workdir / f"{step.name}.json"
    log = check.workdir / f"{step.name}.log"
    command = [
        *(sys.executable, __file__, "--step", step.name, "--device", check.device),
        *("--workdir", str(check.workdir), "--result", str(result)),
        *(["--tiny"] if check.tiny else []),
        *(["--tokenizer", str(check.tokenizer)] if check.tokenizer else []),
    ]
    started = time.monotonic()
    with log.open("w") as output:
        try:
            code = subprocess.run(
                command, env=env, stdout=output, stderr=subprocess.STDOUT, timeout=limit
            ).returncode
        except subprocess.TimeoutExpired:
            code = None
    seconds = time.monotonic() - started
    if result.is_file():
        return Row(step.name, step.title, seconds=seconds, **json.loads(result.read_text()))
    return Row(
        step.name,
        step.title,
        f"FAILED: stopped at its {limit:.0f} s limit"
        if code is None
        else f"FAILED: its process exited with code {code}, no result",
        seconds,
        extra={"output_tail": log.read_text(errors="replace").splitlines()[-30:]},
    )


def run_steps(check: Check, env: dict[str, str], budget: float, cuda: bool) -> list[Row]:
    """Every step in order, each within its limit and what is left of `budget`; then each
    speed against the baseline's."""
    deadline = time.monotonic() + budget
    done: dict[str, Row] = {}
    for step in STEPS:
        limit = min(
            TINY_LIMIT_SECONDS if check.tiny else step.limit_seconds, deadline - time.monotonic()
        )
        reason = why_not_run(step, check, cuda, done)
        if reason is None and limit < MIN_STEP_SECONDS:
            reason = f"out of time (--budget {budget:.0f} s)"
        if reason is not None:
            done[step.name] = Row(step.name, step.title, f"skipped: {reason}")
            continue
        print(f"{step.name}: {step.title} (limit {limit:.0f} s)", file=sys.stderr, flush=True)
        done[step.name] = run_child(step, check, limit, env)
        print(f"{step.name}: {done[step.name].status}", file=sys.stderr, flush=True)
    base = done["baseline"].tokens_per_second if done["baseline"].ok else None
    for step in STEPS:
        row = done[step.name]
        if step.vs_baseline and row.ok and base and row.tokens_per_second is not None:
            row.vs_baseline = row.tokens_per_second / base
    return list(done.values())


def machine(check: Check, cuda: bool) -> dict[str, Any]:
    """What the table was measured on: the GPU (or CPU), and the versions that matter."""
    import torch

    from backpropagate_services.common.hardware import cpu_name

    described: dict[str, Any] = {
        "device": check.device,
        "tiny": check.tiny,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cuda": torch.version.cuda,
        "versions": {name: version_of(name) for name in VERSIONS},
    }
    if cuda:
        properties = torch.cuda.get_device_properties(0)
        described["gpu"] = properties.name
        described["compute_capability"] = f"{properties.major}.{properties.minor}"
        described["gpu_memory_bytes"] = properties.total_memory
    return described


def version_of(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def gib(size: int | None) -> str:
    return f"{size / 2**30:.2f} GiB" if size else "-"


def number(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def show(rows: list[Row], described: dict[str, Any]) -> None:
    """The table, with rich (plain ASCII when not a terminal), then each step's detail."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    terminal = sys.stdout.isatty()
    console = Console(width=None if terminal else 200, highlight=False)
    where = described.get("gpu") or described["cpu"]
    versions = ", ".join(f"{name} {version}" for name, version in described["versions"].items())
    console.print(
        f"GPU check on {where}{', --tiny' if described['tiny'] else ''}: Python "
        f"{described['python']}, CUDA {described['cuda']}; {versions}",
        markup=False,
    )
    table = Table(box=box.SIMPLE_HEAVY if terminal else box.ASCII)
    for column in ("step", "what", "status"):
        table.add_column(column)
    for column in ("tokens/s", "x baseline", "peak", "estimate", "peak/est", "s"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row.name,
            row.title,
            row.status if len(row.status) <= 60 else row.status[:57] + "...",
            number(row.tokens_per_second, ".0f"),
            number(row.vs_baseline, ".2f"),
            gib(row.peak_bytes),
            gib(row.estimate_bytes),
            number(row.peak_over_estimate, ".2f"),
            number(row.seconds or None, ".0f"),
        )
    console.print(table)
    console.print(
        "tokens/s: trained tokens per second over the run; peak: torch's peak allocation on a "
        "GPU (the estimate adds the CUDA context), the process's peak RSS on a CPU",
        markup=False,
    )
    for row in rows:
        if row.detail:
            console.print(f"{row.name}: {row.detail}", markup=False)
        if row.status.startswith("FAILED"):
            console.print(f"{row.name}: {row.status}", markup=False)
            for key in ("log_tail", "traceback", "output_tail"):
                for line in row.extra.get(key, [])[-15:]:
                    console.print(f"    {line}", markup=False)


def write_json(path: Path, rows: list[Row], described: dict[str, Any], seconds: float) -> None:
    table = [{**asdict(row), "peak_over_estimate": row.peak_over_estimate} for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {"machine": described, "total_seconds": seconds, "steps": table}
    path.write_text(json.dumps(summary, indent=2) + "\n")


def importable(wheels: Path | None, workdir: Path) -> list[Path]:
    """The import path entries the steps need on this machine, first to last: the carried
    wheels, our packages where they are not installed, and bench/ (the baseline's module)."""
    entries = [install_wheels(wheels, workdir / "site")] if wheels else []
    links = link_our_packages(workdir / "packages")
    return [*entries, *([links] if links else []), BENCH]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda where there is")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, a few steps")
    parser.add_argument("--wheels", type=Path, help="install these wheels first (gpu-wheels)")
    parser.add_argument("--tokenizer", type=Path, help="default: --wheels' tokenizer, SmolLM2's")
    parser.add_argument("--json", type=Path, help="also write the table here as JSON")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_SECONDS, help="seconds")
    parser.add_argument("--workdir", type=Path, help="keep the model, rows and logs here")
    # A step's own process (run_child): run it here and write its outcome to --result.
    parser.add_argument("--step", choices=sorted(STEPS_BY_NAME), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.step:
        check = Check(args.device, args.workdir, args.tiny, args.tokenizer)
        args.result.write_text(json.dumps(run_step(STEPS_BY_NAME[args.step], check)))
        return 0
    started = time.monotonic()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bp-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    entries = importable(args.wheels, workdir)
    sys.path[:0] = [str(entry) for entry in entries]
    cuda = cuda_available()
    tokenizer = args.tokenizer
    if tokenizer is None and args.wheels and (args.wheels / TOKENIZER_FOLDER).is_dir():
        tokenizer = args.wheels / TOKENIZER_FOLDER
    check = Check(args.device or ("cuda" if cuda else "cpu"), workdir, args.tiny, tokenizer)
    write_rows(check)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [*map(str, entries), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
        "PYTHONUNBUFFERED": "1",
        **({"CUDA_VISIBLE_DEVICES": ""} if check.device == "cpu" else {}),
    }
    try:
        rows = run_steps(check, env, args.budget, cuda)
        described = machine(check, cuda and check.device == "cuda")
        show(rows, described)
        if args.json:
            write_json(args.json, rows, described, time.monotonic() - started)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if any(row.status.startswith("FAILED") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
