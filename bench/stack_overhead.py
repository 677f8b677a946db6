"""What the service stack costs a training job: the same job three ways, each a whole process.

- direct: a Python process that calls the training code itself (load the model, `LoraTraining`,
  save the adapter): the floor, with no queue, store, gRPC, events or checkpoints;
- embedded: `backprop train` with no stack configured (the servicers in the client's process,
  the embedded queue and a local artifact directory);
- services: `backprop train` against a running stack of separate processes, as compose runs it:
  `backprop serve` dataprep, trainer, safety and export, a real Redis, and an S3 server (moto,
  standing in for MinIO). The stack is started before the clock and not counted.

The job: the default model, examples/quickstart.jsonl, `--steps` optimizer steps (default 100)
at fixed hyperparameters. Overhead = (variant's wall time - direct's) / direct's; the goal is
under 2% of a 100-step job. A 2-core machine's step times drift by 10% between runs, more than
the goal, so the same job is also timed at 1 step, where the stack's fixed costs (start-up,
upload, queue, events, the adapter's store) are most of the time: `fixed` is that difference,
and `of job` its share of the long job. The per-step costs (events, the cancel check, the safety
gate) are part of the long job's figure. Medians over repeats, variants interleaved so drift
falls on all of them alike.

    .venv/bin/python bench/stack_overhead.py [--steps 100] [--repeats 2] [--fixed-repeats 3]

Prints the machine and a table; writes bench/results/stack_overhead.json.
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
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import described, speed_flags

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "stack_overhead.json"
DATA = REPO / "examples" / "quickstart.jsonl"
BACKPROP = str(Path(sys.executable).parent / "backprop")
# Fixed, so that the CLI's size-based defaults and the direct call train the same job.
JOB = {"batch_size": 4, "max_length": 512, "lora_r": 16, "lora_alpha": 32, "learning_rate": 2e-4}
VARIANTS = ("direct", "embedded", "services")


def direct(steps: int, out_dir: Path) -> None:
    """The job with no stack: what a script calling our training code would do."""
    from backpropagate_api.settings import get_settings
    from backpropagate_api.training import TrainingConfig
    from backpropagate_services.common.hardware import detect
    from backpropagate_services.common.models import (
        OFFLINE_DEFAULT_ALIAS,
        load_model,
        resolve_model,
    )
    from backpropagate_services.dataprep.formats import parse_jsonl
    from backpropagate_services.trainer.loop.sft import LoraTraining

    settings = get_settings()
    hardware = detect(settings.trainer.cpu_dtype)
    model, tokenizer = load_model(
        resolve_model(OFFLINE_DEFAULT_ALIAS),
        settings.model_cache_dir,
        hardware.device,
        hardware.compute_dtype,
    )
    rows = parse_jsonl(DATA.read_text().splitlines(), DATA.name).conversations
    trained, _ = LoraTraining(
        model,
        tokenizer,
        rows,
        TrainingConfig(steps=steps, **JOB),  # type: ignore[arg-type]
    ).run()
    trained.save_pretrained(out_dir)


def train_argv(steps: int) -> list[str]:
    options = [f"--{name.replace('_', '-')}={value}" for name, value in JOB.items()]
    return [BACKPROP, "train", "--data", str(DATA), f"--steps={steps}", *options]


@contextmanager
def services_stack(home: Path) -> Iterator[dict[str, str]]:
    """Redis, an S3 server and the four services as processes; yields the client's env."""
    sys.path.insert(0, str(REPO / "tests"))
    import servers  # the tests' process helpers: one way to start and stop a server
    from service_processes import serve, stack_env

    from backpropagate_api.settings import Settings
    from backpropagate_services.stack import SERVICES

    with ExitStack() as stack:
        redis_url = stack.enter_context(servers.redis_server())
        s3 = stack.enter_context(servers.moto_server())
        addresses = {service: servers.free_address() for service in SERVICES}
        endpoints = {f"ENDPOINTS__{name.upper()}": address for name, address in addresses.items()}
        env = stack_env(redis_url, s3, Settings().model_cache_dir, home / "stack", **endpoints)
        for service, address in addresses.items():
            stack.enter_context(serve(service, address, env))
        yield {**env, "BACKPROPAGATE_HOME": str(home / "client")}


def timed(argv: list[str], env: dict[str, str] | None) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def job_times(steps: int, repeats: int, tmp: Path, client_env: dict[str, str]) -> dict:
    """Wall seconds of the `steps`-step job, per variant, `repeats` times, interleaved."""
    shared = {**os.environ, "BACKPROPAGATE_MODEL_CACHE": client_env["BACKPROPAGATE_MODEL_CACHE"]}
    seconds: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for repeat in range(repeats):
        out = tmp / f"{steps}-{repeat}"
        commands = {
            "direct": (
                [sys.executable, __file__, f"--steps={steps}", f"--direct={out / 'direct'}"],
                shared,
            ),
            "embedded": (train_argv(steps), {**shared, "BACKPROPAGATE_HOME": str(out / "home")}),
            "services": (train_argv(steps), client_env),
        }
        for variant, (argv, env) in commands.items():
            seconds[variant].append(timed(argv, env))
            print(f"{steps} steps, {variant}: {seconds[variant][-1]:.1f} s", file=sys.stderr)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--fixed-repeats", type=int, default=3)
    parser.add_argument("--direct", type=Path, help=argparse.SUPPRESS)  # the child: its out dir
    args = parser.parse_args()
    if args.direct:
        direct(args.steps, args.direct)
        return
    from backpropagate_services.common.atomic import staged
    from backpropagate_services.common.hardware import cpu_name

    with tempfile.TemporaryDirectory() as tmp, services_stack(Path(tmp)) as client_env:
        whole = job_times(args.steps, args.repeats, Path(tmp), client_env)
        fixed = job_times(1, args.fixed_repeats, Path(tmp), client_env)
    floor = statistics.median(whole["direct"])
    fixed_floor = statistics.median(fixed["direct"])
    print(f"machine: {described()}")
    print(
        f"job: default model, {DATA.name}, {args.steps} steps (medians of {args.repeats}, "
        f"min-max) and 1 step (fixed costs; medians of {args.fixed_repeats})"
    )
    print(
        f"{'variant':10} {'seconds':>8} {'min-max':>13} {'overhead':>9} {'fixed':>7} {'of job':>7}"
    )
    rows = []
    for variant in VARIANTS:
        median, fixed_cost = statistics.median(whole[variant]), statistics.median(fixed[variant])
        row = {
            "variant": variant,
            "seconds": whole[variant],
            "median": median,
            "overhead": median / floor - 1,
            "one_step_seconds": fixed[variant],
            "fixed_seconds": fixed_cost - fixed_floor,
            "fixed_share_of_job": (fixed_cost - fixed_floor) / floor,
        }
        rows.append(row)
        spread = f"{min(whole[variant]):.0f}-{max(whole[variant]):.0f}"
        print(
            f"{variant:10} {median:8.1f} {spread:>13} {row['overhead']:9.1%} "
            f"{row['fixed_seconds']:6.1f}s {row['fixed_share_of_job']:7.1%}"
        )
    summary = {
        "machine": cpu_name(),
        "cpu_flags": speed_flags(),
        "steps": args.steps,
        "job": JOB,
        "results": rows,
    }
    with staged(RESULTS) as partial:
        partial.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
