"""`backprop multi-run`: a campaign of runs on new data, merged without forgetting (SLAO)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from backpropagate.render import (
    FormatOption,
    JsonOption,
    console,
    err_console,
    print_json,
    print_run,
)
from backpropagate.runs_cli import get_run, runs_resume
from backpropagate.sdk import Trainer
from backpropagate_api.errors import UserError
from backpropagate_api.training import TARGET_MODULES_HELP


def multi_run_command(
    data: Annotated[
        list[Path] | None,
        typer.Option(
            "--data",
            "-d",
            help="Dataset every run samples; given several times, one dataset per run, in order.",
        ),
    ] = None,
    runs: Annotated[
        int, typer.Option(help="Runs in the campaign (0: one per --data, else 5).")
    ] = 0,
    steps: Annotated[int, typer.Option(help="Optimizer steps per run.")] = 100,
    samples: Annotated[
        int,
        typer.Option(
            help="Rows each run draws, none drawn by another run (0: an equal share of the pool)."
        ),
    ] = 0,
    merge: Annotated[
        str,
        typer.Option(help="slao (default), last-merge, no-qr, average or sequential (no merge)."),
    ] = "",
    with_replacement: Annotated[
        bool, typer.Option(help="Let each run draw from the whole pool; runs may share rows.")
    ] = False,
    continue_from: Annotated[
        str, typer.Option(help="A finished campaign whose merged adapter this one goes on from.")
    ] = "",
    replay: Annotated[
        float | None,
        typer.Option(
            help="Rehearsal: each run also trains on rows of the campaign's earlier runs, this "
            "share of its own (default 0.1: a tenth more, what measured best against "
            "forgetting; 0: none).",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str, typer.Option(help="HF id, local HF dir or .gguf file; default: this machine's.")
    ] = "",
    learning_rate: Annotated[float, typer.Option(help="Peak learning rate (0: default).")] = 0.0,
    batch_size: Annotated[int, typer.Option(help="Conversations per step (0: default).")] = 0,
    max_length: Annotated[int, typer.Option(help="Tokens per example (0: default).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the first run; run i uses seed + i - 1.")] = 0,
    lora_r: Annotated[int, typer.Option(help="LoRA rank (0: default).")] = 0,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha (0: default).")] = 0,
    target_modules: Annotated[str, typer.Option(help=TARGET_MODULES_HELP)] = "",
    adapter: Annotated[str, typer.Option(help="lora (default), rslora or qlora (CUDA).")] = "",
    eval_split: Annotated[
        float, typer.Option(help="Fraction of each run's rows held out for eval loss (0: none).")
    ] = 0.0,
    checkpoint_every: Annotated[
        int, typer.Option(help="Steps between checkpoints (0: every ~5 minutes; always at end).")
    ] = 0,
    data_format: FormatOption = "auto",
    detach: Annotated[
        bool,
        typer.Option(help="Submit, print the campaign id and exit; follow with `runs watch`."),
    ] = False,
    resume: Annotated[
        str,
        typer.Option(help="Continue this unfinished campaign instead (as `backprop runs resume`)."),
    ] = "",
    output_dir: Annotated[
        Path | None,
        typer.Option(help="Save the merged adapter here when the campaign ends, as DIR/lora."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Train again and again on new data without forgetting: runs merged by SLAO."""
    if resume:
        runs_resume(resume)
        return
    if not data:
        raise UserError("Nothing to train on.", hint="Pass --data my_data.jsonl (or --resume).")
    trainer = Trainer(model, output_dir=output_dir)
    campaign = trainer.multi_run(
        data if len(data) > 1 else data[0],
        runs=runs,
        steps_per_run=steps,
        samples_per_run=samples,
        merge=merge,
        with_replacement=with_replacement,
        continue_from=continue_from,
        replay=replay,
        learning_rate=learning_rate,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        target_modules=[name.strip() for name in target_modules.split(",") if name.strip()],
        adapter=adapter,
        eval_split=eval_split,
        checkpoint_every=checkpoint_every,
        data_format=data_format,
        wait=not detach,
    )
    if as_json:  # the record with proto field names, for scripts
        print_json(get_run(trainer.reader, campaign.run_id))
        return
    if detach:
        console.print(campaign.run_id)
        err_console.print(f"follow it with: backprop runs watch {campaign.run_id}")
        return
    print_run(campaign)
    console.print(f"next: [bold]backprop export {campaign.run_id}[/] (the merged adapter)")
