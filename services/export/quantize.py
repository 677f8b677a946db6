"""GGUF quantisation with llama.cpp's `llama_model_quantize`, the code behind `llama-quantize`.

Only llama.cpp implements the K-quants (q4_k_m, q5_k_m ...) with their per-tensor type mix;
the pure-numpy `gguf.quants` stops at Q8_0 / Q4_x. See docs/export.md for the measurements
behind `default_quantization`.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

from backpropagate_services.common.errors import ConfigError, ConversionError
from backpropagate_services.export.staging import staged

log = logging.getLogger(__name__)

# Name users type -> name of the llama.cpp `llama_ftype` constant.
QUANTIZATIONS: dict[str, str] = {
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}

# Below this size, 4-bit K-quants cost more quality than they save space: measured on
# SmolLM2-135M, whose 576-wide rows are no multiple of the 256-element K-quant super-block
# (see docs/export.md). Models this small fit anywhere at q8_0.
SMALL_MODEL_PARAMETERS = 1_000_000_000


def normalise_quantization(name: str) -> str:
    """The canonical lower-case name, or ConfigError listing the valid ones."""
    canonical = name.strip().lower()
    if canonical not in QUANTIZATIONS:
        raise ConfigError(
            f"Unknown quantization {name!r}.",
            hint=f"Use one of: {', '.join(QUANTIZATIONS)}.",
            quantization=name,
        )
    return canonical


def default_quantization(num_parameters: int) -> str:
    """q8_0 for small models (4-bit visibly breaks them), q4_k_m from a billion parameters up."""
    return "q8_0" if num_parameters < SMALL_MODEL_PARAMETERS else "q4_k_m"


def quantize_gguf(src: Path, dst: Path, quantization: str, threads: int = 0) -> Path:
    """Write `dst` as `src` quantised; on failure raise ConversionError and leave no `dst`.

    `threads` 0 lets llama.cpp use every core; the result does not depend on it.
    """
    import llama_cpp

    quantization = normalise_quantization(quantization)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZATIONS[quantization])
    params.nthread = threads or os.cpu_count() or 1
    # A fine-tuned model exported twice may arrive already quantised; requantising is lossy but
    # explicit here, and without the flag llama.cpp fails and leaves a partial file.
    params.allow_requantize = True
    with staged(dst) as partial:
        log.info("quantising %s to %s", src.name, quantization)
        status = llama_cpp.llama_model_quantize(
            str(src).encode(), str(partial).encode(), ctypes.byref(params)
        )
        if status != 0 or not partial.is_file():
            raise ConversionError(
                f"llama.cpp could not quantise {src} to {quantization} (status {status}).",
                hint="Check that the input is a complete GGUF file; llama.cpp logs the cause.",
                source=str(src),
                quantization=quantization,
            )
    return dst
