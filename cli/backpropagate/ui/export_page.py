"""Export: a finished run to a verified GGUF (or the merged model, the adapter), with its format
and quantisation; progress stage by stage; the verification report; registration with Ollama;
the file to download. Exports are downloaded into the output directory's exports/ folder, where
the Chat page finds them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from backpropagate.render import export_rows
from backpropagate.results import ExportResult
from backpropagate.run_history import list_runs, resolve_run_id
from backpropagate.ui.context import UiContext
from backpropagate.ui.handlers import shown_errors
from backpropagate.ui.streaming import Finished, streamed
from backpropagate.ui.views import error_markdown, export_progress, rows_markdown
from backpropagate.workflows import export
from backpropagate_api.errors import BackpropagateError, ConfigError, NotFoundError

FORMATS = ("gguf", "hf", "adapter", "adapter-gguf")
QUANTIZATIONS = ("", "f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")


def finished_runs(context: UiContext) -> list[tuple[str, str]]:
    """Runs with an adapter to export, newest first, labelled so a person can tell them apart."""
    runs = list_runs(context.connection, status="succeeded", limit=200).runs
    return [
        (f"{run.run_id} · {run.base_model or 'default'} · loss {run.final_loss:.3f}", run.run_id)
        for run in runs
    ]


def report_markdown(result: ExportResult) -> str:
    rows = export_rows(result)
    if result.smoke_answer:
        rows.append((f"smoke answer to {result.smoke_prompt!r}", result.smoke_answer))
    text = rows_markdown(rows)
    if result.verification_warning:
        text = f"**warning**: {result.verification_warning}\n\n{text}"
    return text


def build(context: UiContext, tab: gr.Tab) -> None:
    with gr.Row():
        run = gr.Dropdown([], label="run", elem_id="export-run", scale=3)
        refresh = gr.Button("Refresh", scale=1)
    with gr.Row():
        export_format = gr.Dropdown(list(FORMATS), value="gguf", label="format")
        quantization = gr.Dropdown(
            list(QUANTIZATIONS),
            value="",
            label="quantization (empty: the one that keeps this model's answers intact)",
            elem_id="export-quantization",
        )
        prompt = gr.Textbox(label="smoke-test prompt (empty: the default)")
    with gr.Row():
        to_ollama = gr.Checkbox(
            label="register with Ollama (OLLAMA_HOST)", elem_id="export-ollama-register"
        )
        ollama_name = gr.Textbox(
            label="Ollama model name (empty: the file's)", elem_id="export-ollama-name"
        )
        system = gr.Textbox(label="system prompt for Ollama")
    start = gr.Button("Export", variant="primary", elem_id="export-start")
    progress = gr.Markdown(elem_id="export-progress")
    report = gr.Markdown(elem_id="export-report")
    ollama = gr.Markdown(elem_id="export-ollama")
    download = gr.File(label="download", interactive=False, elem_id="export-file")

    def choices() -> Any:
        return gr.update(choices=finished_runs(context))

    def registered(result: ExportResult, name: str, system_prompt: str) -> str:
        from backpropagate.ollama import register_with_ollama

        try:
            model = register_with_ollama(
                result.path, name.strip() or result.path.stem.lower(), system=system_prompt or None
            )
        except BackpropagateError as error:  # the export stands; only the hand-over failed
            return error_markdown(error)
        return f"Ollama: registered **{model.name}** at {model.host}: `ollama run {model.name}`"

    @shown_errors
    def run_export(
        run_text: str | None,
        fmt: str,
        quant: str,
        smoke_prompt: str,
        register: bool,
        name: str,
        system_prompt: str,
    ) -> Iterator[dict[Any, Any]]:
        if register and fmt != "gguf":
            raise ConfigError(
                f"Ollama takes a GGUF of the whole model, not {fmt}.",
                hint="Export with the gguf format to register it with Ollama.",
            )
        if not run_text:
            raise NotFoundError("No run picked.", hint="Pick a finished run to export.")
        connection = context.connection
        run_id = resolve_run_id(connection, run_text)
        context.trainer().start_worker()
        yield {progress: "queued", report: "", ollama: "", download: None}

        def exported(on_event: Any) -> ExportResult:
            return export(
                connection,
                run_id,
                context.exports_dir,
                export_format=fmt,
                quantization=quant,
                prompt=smoke_prompt,
                on_event=on_event,
            )

        result: ExportResult | None = None
        for update in streamed(exported):
            if isinstance(update, Finished):
                result = update.result
            else:
                yield {progress: export_progress(update)}
        assert result is not None  # streamed() ends with Finished, or raises
        yield {
            progress: f"exported {result.path.name} in {result.duration_seconds:.0f} s",
            report: report_markdown(result),
            download: str(result.path) if result.path.is_file() else None,
        }
        if register:
            yield {ollama: registered(result, name, system_prompt)}

    refresh.click(choices, None, run)
    tab.select(choices, None, run)
    start.click(
        run_export,
        [run, export_format, quantization, prompt, to_ollama, ollama_name, system],
        [progress, report, ollama, download],
    )
