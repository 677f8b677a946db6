"""`backprop`: the command-line client. Each command is a thin shell over the SDK workflows.

Exit codes: 0 ok, 1 user error, 2 runtime error, 3 partial failure (e.g. trained, export failed),
130 interrupted (Ctrl-C; a run in progress is checkpointed).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.prompt import Prompt
from rich.table import Table
from typer import rich_utils

from backpropagate.connection import VERBOSE_VARIABLE, Connection, verbose
from backpropagate.data_cli import column_mapping, data_app, language_codes
from backpropagate.effective_config import config_command
from backpropagate.estimate_cli import estimate_vram_command
from backpropagate.in_process import STACK_EXTRAS, services_needed
from backpropagate.info_cli import info_command
from backpropagate.multi_run_cli import multi_run_command
from backpropagate.render import (
    FormatOption,
    JsonOption,
    LanguagesOption,
    console,
    err_console,
    print_export,
    print_json,
    print_run,
)
from backpropagate.results import status_name
from backpropagate.runs_cli import add_run_aliases, runs_app, runs_resume
from backpropagate.sdk import Trainer, adapter_directory, adapter_of_mode
from backpropagate.ui.command import ui_command
from backpropagate_api.errors import (
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    BackpropagateError,
    ConfigError,
    PartialFailureError,
    UserError,
)
from backpropagate_api.redaction import redact
from backpropagate_api.setting_names import unknown_variables
from backpropagate_api.settings import get_settings
from backpropagate_api.training import TARGET_MODULES_HELP
from backpropagate_api.v1 import export_pb2

app = typer.Typer(
    help="Fine-tune a LoRA on a JSONL file, export a verified GGUF, chat with it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(runs_app, name="runs")
app.add_typer(data_app, name="data")
app.command("config")(config_command)
app.command("info")(info_command)
app.command("estimate-vram")(estimate_vram_command)
app.command("multi-run")(multi_run_command)
app.command("ui")(ui_command)
add_run_aliases(app)
exports_app = typer.Typer(help="Inspect and cancel exports.", no_args_is_help=True)
app.add_typer(exports_app, name="exports")


QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.jsonl"
DEMO_PROMPT = "How do I fine-tune a small model on my own chat data?"
DEMO_STEPS = 40


@app.callback()
def options(
    verbose_output: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="Debug logs on the terminal (BACKPROPAGATE_LOG_LEVEL=DEBUG) and an error's "
            "whole traceback.",
        ),
    ] = False,
) -> None:
    """Options of every command."""
    if verbose_output:
        # Through the environment: a worker process this one starts is verbose too.
        os.environ[VERBOSE_VARIABLE] = "1"
        os.environ["BACKPROPAGATE_LOG_LEVEL"] = "DEBUG"
        get_settings.cache_clear()


@app.command("train")
def train_command(
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            "-d",
            help="Dataset to train on: a JSONL, CSV, TSV or Parquet file, a saved dataset "
            "directory, or a Hub dataset id.",
        ),
    ] = None,
    model: Annotated[
        str, typer.Option(help="HF id, local HF dir or .gguf file; default: this machine's.")
    ] = "",
    steps: Annotated[
        int, typer.Option(help="Optimizer steps (0: from --epochs, else from the data's size).")
    ] = 0,
    epochs: Annotated[
        float, typer.Option(help="Passes over the data, instead of --steps (0: use steps).")
    ] = 0.0,
    batch_size: Annotated[int, typer.Option(help="Conversations per step (0: default).")] = 0,
    learning_rate: Annotated[float, typer.Option(help="Peak learning rate (0: default).")] = 0.0,
    lora_r: Annotated[int, typer.Option(help="LoRA rank (0: default).")] = 0,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha (0: default).")] = 0,
    max_length: Annotated[int, typer.Option(help="Tokens per example (0: default).")] = 0,
    seed: Annotated[
        int, typer.Option(help="Seed for init, data order and dropout (0: the default, 42).")
    ] = 0,
    data_format: FormatOption = "auto",
    gradient_accumulation: Annotated[
        int, typer.Option(help="Micro-batches per step (0: 1); same result, less memory.")
    ] = 0,
    checkpoint_every: Annotated[
        int, typer.Option(help="Steps between checkpoints (0: every ~5 minutes; always at end).")
    ] = 0,
    oom_recovery: Annotated[
        bool,
        typer.Option(help="On out-of-memory, halve the micro-batch and go on (up to 3 times)."),
    ] = True,
    detach: Annotated[
        bool,
        typer.Option(help="Submit, print the run id and exit; follow with `backprop runs watch`."),
    ] = False,
    resume: Annotated[
        str, typer.Option(help="Continue this unfinished run instead (as `backprop runs resume`).")
    ] = "",
    lora_dropout: Annotated[
        float | None, typer.Option(help="Dropout on the LoRA input (0: none; default 0.05).")
    ] = None,
    warmup_ratio: Annotated[
        float | None, typer.Option(help="Fraction of steps warming the learning rate up.")
    ] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay.")] = None,
    max_grad_norm: Annotated[
        float | None, typer.Option(help="Clip gradients to this global L2 norm.")
    ] = None,
    target_modules: Annotated[str, typer.Option(help=TARGET_MODULES_HELP)] = "",
    method: Annotated[
        str, typer.Option(help="sft (default), or dpo, orpo, simpo, kto on preference data.")
    ] = "",
    adapter: Annotated[
        str, typer.Option(help="lora (default), dora, rslora, qlora (CUDA GPU) or full.")
    ] = "",
    fp8: Annotated[bool, typer.Option(help="FP8 compute (Hopper/Blackwell GPUs).")] = False,
    preset: Annotated[
        str,
        typer.Option(help="Training preset: fast, balanced, quality or fast-3b (fills the rest)."),
    ] = "",
    lora_preset: Annotated[
        str, typer.Option(help="LoRA preset: fast (r=16, q/v), balanced, quality (r=256).")
    ] = "",
    lr_scheduler: Annotated[
        str, typer.Option(help="After warmup: linear (default), cosine or constant.")
    ] = "",
    eval_split: Annotated[
        float, typer.Option(help="Fraction of the data held out for eval loss (0: none).")
    ] = 0.0,
    eval_data: Annotated[
        Path | None, typer.Option(help="A separate dataset to compute eval loss on.")
    ] = None,
    eval_every: Annotated[int, typer.Option(help="Steps between evals (0: ~10 a run).")] = 0,
    early_stopping_patience: Annotated[
        int, typer.Option(help="Stop after this many evals without improvement (0: off).")
    ] = 0,
    min_tokens: Annotated[
        int, typer.Option(help="Leave out rows shorter than this many tokens (0: none).")
    ] = 0,
    max_tokens: Annotated[
        int,
        typer.Option(help="Leave out rows longer than this, instead of cutting them (0: none)."),
    ] = 0,
    perplexity_drop: Annotated[
        float,
        typer.Option(
            help="Leave out this fraction of rows with the base model's highest perplexity."
        ),
    ] = 0.0,
    curriculum: Annotated[
        str,
        typer.Option(help="First pass easiest first: length or perplexity (default: none)."),
    ] = "",
    adapter_scale: Annotated[
        float,
        typer.Option(
            help="Scale the trained update by this at the end: below 1 keeps more of the base "
            "model (0: default)."
        ),
    ] = 0.0,
    beta: Annotated[
        float | None, typer.Option(help="Preference strength (DPO/KTO/SimPO beta, ORPO weight).")
    ] = None,
    nproc_per_node: Annotated[
        int,
        typer.Option(
            help="Processes training the run together, one per GPU (torchrun; 0: one); "
            "--batch-size stays the optimizer's batch."
        ),
    ] = 0,
    report_to: Annotated[
        str, typer.Option(help="Trackers: auto (default), none, or tensorboard,wandb,mlflow.")
    ] = "",
    mode: Annotated[str, typer.Option(help="lora or full: the same as --adapter.")] = "",
    output_dir: Annotated[
        Path | None,
        typer.Option(
            help="Save the adapter here when the run ends, as DIR/lora (replacing an earlier "
            "run's); `backprop export DIR/lora` takes it. Default: kept in the store only."
        ),
    ] = None,
    backend: Annotated[
        str, typer.Option(help="auto: the CUDA GPU, else the CPU (MLX is not offered).")
    ] = "auto",
    strict: Annotated[
        bool,
        typer.Option(help="Fail on the first bad row (default: leave bad rows out, up to 10%)."),
    ] = False,
    columns: Annotated[
        str,
        typer.Option(
            help="CSV/TSV/Parquet columns to rename, e.g. 'question=instruction,answer=output' "
            "(prompt/response are known already)."
        ),
    ] = "",
    dedup: Annotated[
        str,
        typer.Option(
            help="Remove repeated rows: exact (same text), near (MinHash, 80%+ alike) or none."
        ),
    ] = "",
    languages: LanguagesOption = "",
) -> None:
    """Fine-tune a LoRA adapter on a JSONL chat dataset."""
    if resume:
        runs_resume(resume)
        return
    if data is None:
        raise UserError("Nothing to train on.", hint="Pass --data my_data.jsonl (or --resume RUN).")
    run = Trainer(model, output_dir=output_dir, backend=backend).train(
        data,
        steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        max_length=max_length,
        seed=seed,
        data_format=data_format,
        gradient_accumulation=gradient_accumulation,
        checkpoint_every=checkpoint_every,
        oom_recovery=oom_recovery,
        lora_dropout=lora_dropout,
        warmup_ratio=warmup_ratio,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        target_modules=[name.strip() for name in target_modules.split(",") if name.strip()],
        method=method,
        adapter=adapter or adapter_of_mode(mode),
        fp8=fp8,
        preset=preset,
        lora_preset=lora_preset,
        min_tokens=min_tokens,
        max_tokens=max_tokens,
        perplexity_drop=perplexity_drop,
        curriculum=curriculum,
        adapter_scale=adapter_scale,
        nproc_per_node=nproc_per_node,
        lr_scheduler=lr_scheduler,
        eval_split=eval_split,
        eval_data=eval_data,
        eval_every=eval_every,
        early_stopping_patience=early_stopping_patience,
        beta=beta,
        report_to=[name.strip() for name in report_to.split(",") if name.strip()],
        wait=not detach,
        strict=strict,
        columns=column_mapping(columns),
        dedup=dedup,
        languages=language_codes(languages),
    )
    if detach:
        console.print(run.run_id)
        err_console.print(f"follow it with: backprop runs watch {run.run_id}")
        return
    print_run(run)
    if output_dir is not None:
        console.print(f"adapter saved: {adapter_directory(output_dir)}")
    console.print(
        f"next: [bold]backprop export {run.run_id}[/]  "
        f"(loss curve: backprop runs show {run.run_id} --plot loss.png)"
    )


@app.command("export")
def export_command(
    run_id: Annotated[
        str, typer.Argument(help="The run whose adapter to export, or a local adapter directory.")
    ],
    export_format: Annotated[str, typer.Option("--format", help="Export format.")] = "gguf",
    quantization: Annotated[
        str,
        typer.Option(
            help="f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0; default: the safe one."
        ),
    ] = "",
    output_dir: Annotated[Path, typer.Option(help="Where to download the file.")] = Path("."),
    prompt: Annotated[str, typer.Option(help="Smoke-test chat prompt.")] = "",
    ollama: Annotated[
        bool, typer.Option("--ollama", help="Register the GGUF with Ollama (OLLAMA_HOST).")
    ] = False,
    ollama_name: Annotated[
        str, typer.Option(help="Name of the Ollama model; default: the file's name.")
    ] = "",
    ollama_modelfile: Annotated[
        bool, typer.Option("--ollama-modelfile", help="Write <file>.Modelfile beside the GGUF.")
    ] = False,
    system: Annotated[str, typer.Option(help="System prompt for Ollama (SYSTEM).")] = "",
    num_ctx: Annotated[int, typer.Option(help="Ollama context length (num_ctx).")] = 4096,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the export record as JSON (proto names).")
    ] = False,
    model: Annotated[
        str, typer.Option(help="Base model of an adapter directory; default: its config's.")
    ] = "",
) -> None:
    """Merge a run's adapter, write a verified GGUF (or --format hf: the merged model as
    safetensors; adapter-gguf: a GGUF adapter and its base GGUF), smoke-test it and download it;
    optionally hand it to Ollama."""
    if (ollama or ollama_modelfile) and export_format != "gguf":
        raise ConfigError(
            f"--ollama and --ollama-modelfile take a GGUF of the whole model, not {export_format}.",
            hint="Export with --format gguf to hand the model to Ollama.",
            format=export_format,
        )
    result = Trainer(model, progress=not as_json).export(
        export_format,
        run_id=run_id,
        quantization=quantization,
        output_dir=output_dir,
        prompt=prompt,
    )
    if as_json:
        console.print_json(data={**result.record, "path": str(result.path)})
    else:
        print_export(result)
        if result.smoke_answer:
            console.print(Panel(result.smoke_answer, title=f"llama.cpp: {result.smoke_prompt}"))
    # Imported here: the export packages are not in every image that carries this CLI.
    from backpropagate.ollama import register_with_ollama, write_ollama_modelfile

    if ollama_modelfile:
        modelfile = write_ollama_modelfile(result.path, system=system or None, num_ctx=num_ctx)
        err_console.print(f"Modelfile: {modelfile}  (ollama create NAME -f {modelfile})")
    if ollama:
        name = ollama_name or result.path.stem.lower()
        try:
            registered = register_with_ollama(
                result.path, name, system=system or None, num_ctx=num_ctx
            )
        except BackpropagateError as exc:
            raise PartialFailureError(
                f"Exported {result.path}, but the Ollama registration failed: {exc}",
                hint=exc.hint,
            ) from exc
        err_console.print(f"Ollama: registered [bold]{registered.name}[/] at {registered.host}")
        err_console.print(f"next: [bold]ollama run {registered.name}[/]")


@app.command("push")
def push_command(
    run_id: Annotated[str, typer.Argument(help="A run id, or a local adapter directory.")],
    repo: Annotated[str, typer.Option(help="Hub repository, owner/name.")],
    merged: Annotated[
        bool, typer.Option("--merged", help="Push the merged model instead of the adapter.")
    ] = False,
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    model: Annotated[
        str, typer.Option(help="Base model of an adapter directory; default: its config's.")
    ] = "",
) -> None:
    """Push a run's adapter (or merged model) to the Hugging Face Hub with a model card."""
    url = Trainer(model).push(repo, run_id=run_id, merged=merged, private=private)
    console.print(f"pushed: {url}")


@exports_app.command("show")
def exports_show(
    export_id: Annotated[str, typer.Argument(help="Export id.")], as_json: JsonOption = False
) -> None:
    """Show one export's record: status, files, verification report."""
    connection = Connection.for_reading()
    result = connection.call(
        "export", connection.export.GetExport, export_pb2.GetExportRequest(export_id=export_id)
    )
    if as_json:
        print_json(result)
        return
    table = Table(show_header=False, box=None)
    report = result.verification
    for label, value in [
        ("export", result.export_id),
        ("run", result.run_id),
        ("status", status_name(result.status)),
        ("format", f"{result.format} {result.quantization}"),
        *(("file", f"{file.name} ({file.size_bytes / 2**20:.1f} MiB)") for file in result.files),
        ("agreement with torch", f"{report.top1_agreement:.1%} top-1, KL {report.mean_kl:.4f}"),
        ("smoke answer", result.smoke_answer),
    ]:
        table.add_row(f"[bold]{label}[/]", value)
    console.print(table)
    if result.error.code:
        console.print(f"[red]{result.error.code}[/]: {result.error.message}")


@exports_app.command("cancel")
def exports_cancel(
    export_id: Annotated[str, typer.Argument(help="Export id.")], as_json: JsonOption = False
) -> None:
    """Cancel a queued or running export: it stops before its next stage, or at once while
    llama.cpp runs (quantise, verify, smoke)."""
    connection = Connection.open(workers=False)
    result = connection.call(
        "export",
        connection.export.CancelExport,
        export_pb2.CancelExportRequest(export_id=export_id),
    )
    if as_json:
        print_json(result)
    else:
        console.print(f"{result.export_id}: cancel requested ({status_name(result.status)})")


@app.command("serve")
def serve(
    service: Annotated[
        str, typer.Argument(help="all, dataprep, trainer, safety or export.")
    ] = "all",
    listen: Annotated[str, typer.Option(help="host:port to bind (default: settings).")] = "",
) -> None:
    """Run one service, or all of them in one process, until interrupted."""
    with services_needed("backprop serve", STACK_EXTRAS):
        from backpropagate_services.common.logs import configure_logging
        from backpropagate_services.stack import SERVICES, start_stack, torchrun_rank

        settings = get_settings()
        configure_logging(settings.log_level, json_lines=settings.log_json)
        exit_code = torchrun_rank(service, settings)
        if exit_code is not None:  # one rank of one job across nodes
            raise typer.Exit(exit_code)
        services = list(SERVICES) if service == "all" else [service]
        stack = start_stack(settings, services, listen or settings.listen)
    signal.signal(signal.SIGTERM, lambda *_: stack.stop())
    err_console.print(f"serving {', '.join(services)} on {stack.address}")
    try:
        stack.wait()
    except KeyboardInterrupt:
        stack.stop()


def _one_answer(gguf: Path, prompt: str, max_tokens: int, system: str = "") -> str:
    from backpropagate import chat

    threads = get_settings().export.threads
    return chat.ask_once(gguf, prompt, system=system, threads=threads, max_tokens=max_tokens)


@app.command("chat")
def chat_command(
    target: Annotated[str, typer.Argument(help="A .gguf file, or a run id (its export).")],
    message: Annotated[
        str | None, typer.Argument(help="What to ask; omit it to chat interactively.")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.")] = 256,
    system: Annotated[str, typer.Option(help="A system prompt.")] = "",
) -> None:
    """Chat with an export in llama.cpp through its own chat template."""
    from backpropagate import chat

    settings = get_settings()

    def export_run(run_id: str, directory: Path) -> Path:
        err_console.print(f"exporting run {run_id} for chat (once) into {directory}")
        return Trainer().export(run_id=run_id, output_dir=directory).path

    gguf = chat.resolve_chat_target(target, settings, export_run)
    if message is not None:
        console.print(_one_answer(gguf, message, max_tokens, system))
        return

    def ask() -> str | None:
        try:
            return Prompt.ask("[bold]you[/]", console=err_console)
        except EOFError:
            return None

    err_console.print(f"chatting with {gguf.name}; an empty line or /exit ends it")
    chat.converse(
        gguf,
        ask,
        lambda text: console.print(f"[bold]model[/]: {text}"),
        system=system,
        threads=settings.export.threads,
        max_tokens=max_tokens,
    )


@app.command("demo")
def demo(
    steps: Annotated[int, typer.Option(help="Training steps.")] = DEMO_STEPS,
    output_dir: Annotated[Path, typer.Option(help="Where the GGUF goes.")] = Path("out"),
) -> None:
    """The main job end to end: train on examples/quickstart.jsonl, export, chat."""
    trainer = Trainer()
    started = time.monotonic()
    run = trainer.train(QUICKSTART, steps=steps)
    trained = time.monotonic()
    print_run(run)
    try:
        result = trainer.export(output_dir=output_dir)
    except BackpropagateError as exc:
        raise PartialFailureError(
            f"Trained {run.run_id}, but the export failed: {exc}", hint=exc.hint
        ) from exc
    exported = time.monotonic()
    print_export(result)
    answer = _one_answer(result.path, DEMO_PROMPT, 96)
    chatted = time.monotonic()
    console.print(
        f"timings: train {trained - started:.1f}s, export {exported - trained:.1f}s, "
        f"chat {chatted - exported:.1f}s"
    )
    console.print(Panel(answer, title=f"{result.path.name}: {DEMO_PROMPT}"))


def main() -> None:
    """Entry point: errors become one readable message and a stable exit code."""
    for variable in unknown_variables():  # a misspelt setting would otherwise change nothing
        err_console.print(f"[bold yellow]warning[/]: {escape(variable.warning())}", soft_wrap=True)
    try:
        # Not standalone: click would exit 2 on a usage error, our code for a runtime error.
        exit_code = app(standalone_mode=False)
    except typer.TyperException as exc:  # an unknown option, a missing argument: user errors
        rich_utils.rich_format_error(exc)  # type: ignore[arg-type]
        sys.exit(EXIT_USER_ERROR)
    except typer.Abort:  # end of input at a prompt
        sys.exit(EXIT_INTERRUPTED)
    except BackpropagateError as exc:
        # Whole lines (the terminal wraps them), so a hint's command can be copied or grepped.
        _print_traceback_if_verbose()
        err_console.print(f"[bold red]error {exc.code}[/]: {escape(exc.message)}", soft_wrap=True)
        err_console.print(f"[dim]hint:[/] {escape(exc.hint)}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        # A run this process was training is checkpointed and released on the way out.
        err_console.print(
            "[bold yellow]interrupted[/]: a run in progress is checkpointed; continue it with "
            "`backprop runs resume RUN` (`backprop runs list` shows it)."
        )
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # a bug: still one message, the traceback only when asked for
        _print_traceback_if_verbose()
        bug = BackpropagateError(f"{type(exc).__name__}: {exc}")
        err_console.print(f"[bold red]error {bug.code}[/]: {escape(bug.message)}", soft_wrap=True)
        err_console.print(
            f"[dim]hint:[/] {escape(bug.hint)} (--verbose shows the traceback)", soft_wrap=True
        )
        sys.exit(bug.exit_code)
    sys.exit(exit_code if isinstance(exit_code, int) else 0)


def _print_traceback_if_verbose() -> None:
    """The exception being handled, whole, redacted like every log line (--verbose)."""
    if verbose():
        err_console.print(redact(traceback.format_exc()), markup=False, highlight=False)


if __name__ == "__main__":
    main()
