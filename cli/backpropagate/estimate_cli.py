"""`backprop estimate-vram`: a run's predicted peak memory, before any weight is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from backpropagate.render import FormatOption, JsonOption, console
from backpropagate.results import MemoryEstimateResult
from backpropagate.sdk import Trainer
from backpropagate_api.training import TARGET_MODULES_HELP

GIB = 1024**3
MIB = 1024**2


def size(value: int) -> str:
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / MIB:.0f} MiB"


def estimate_parts(estimate: MemoryEstimateResult) -> list[tuple[str, int]]:
    """The predicted peak's parts, (what, bytes), as the CLI and the web UI show them."""
    return [
        (f"base weights ({estimate.parameters / 1e6:,.0f} M parameters)", estimate.weights_bytes),
        (
            f"trainable: weights, gradients, AdamW ({estimate.trainable_parameters:,} params)",
            estimate.trainable_bytes,
        ),
        ("activations of the largest micro-batch", estimate.activations_bytes),
        ("runtime overhead", estimate.overhead_bytes),
    ]


def print_estimate(estimate: MemoryEstimateResult) -> None:
    table = Table("part", "memory", title=f"peak memory of the run on {estimate.device}")
    for label, value in estimate_parts(estimate):
        table.add_row(label, size(value))
    table.add_section()
    table.add_row("[bold]predicted peak[/]", f"[bold]{size(estimate.total_bytes)}[/]")
    table.add_row("available now", size(estimate.available_bytes))
    console.print(table)
    if estimate.plan:
        console.print(f"fitted to the GPU: {estimate.plan}")
    if estimate.fits:
        console.print("[green]fits[/]")
    else:
        console.print(
            "[red]does not fit[/]: lower --batch-size or --max-length, or set "
            "--gradient-accumulation"
        )


def estimate_vram_command(
    data: Annotated[
        Path | None,
        typer.Option("--data", "-d", help="JSONL dataset: its longest rows size activations."),
    ] = None,
    model: Annotated[
        str, typer.Option(help="HF id, local HF dir or .gguf file; default: this machine's.")
    ] = "",
    batch_size: Annotated[int, typer.Option(help="Conversations per step (0: default).")] = 0,
    gradient_accumulation: Annotated[
        int, typer.Option(help="Micro-batches per step (0: what this machine holds).")
    ] = 0,
    max_length: Annotated[int, typer.Option(help="Tokens per example (0: default).")] = 0,
    lora_r: Annotated[int, typer.Option(help="LoRA rank (0: default).")] = 0,
    adapter: Annotated[
        str, typer.Option(help="lora, dora, rslora, qlora (CUDA) or full (default: lora).")
    ] = "",
    target_modules: Annotated[str, typer.Option(help=TARGET_MODULES_HELP)] = "",
    data_format: FormatOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Predict a training run's peak memory (VRAM on a GPU, RAM on the CPU) and whether it fits,
    from the model's config alone: no weights are loaded."""
    estimate = Trainer(model, progress=False).estimate_memory(
        data,
        batch_size=batch_size,
        gradient_accumulation=gradient_accumulation,
        max_length=max_length,
        lora_r=lora_r,
        adapter=adapter,
        target_modules=[name.strip() for name in target_modules.split(",") if name.strip()],
        data_format=data_format,
    )
    if as_json:
        console.print_json(data=estimate.record)
        return
    print_estimate(estimate)
