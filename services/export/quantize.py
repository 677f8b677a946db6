"""GGUF quantisation with llama.cpp's `llama_model_quantize`, the code behind `llama-quantize`.

Only llama.cpp implements the K-quants (q4_k_m, q5_k_m ...) with their per-tensor type mix;
the pure-numpy `gguf.quants` stops at Q8_0 / Q4_x. docs/export.md has the measurements behind
`default_quantization`.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

from backpropagate_api.errors import ConfigError, ConversionError, quoted
from backpropagate_services.common.atomic import staged
from backpropagate_services.common.isolation import run_isolated
from backpropagate_services.export.llama_runtime import load_llama_cpp

log = logging.getLogger(__name__)

# Name users type -> llama.cpp `llama_ftype` constant, most faithful first.
QUANTIZATIONS: dict[str, str] = {
    "f32": "LLAMA_FTYPE_ALL_F32",
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
# Written by the converter itself, no quantisation step: the same model in another float type.
UNQUANTIZED = ("f32", "f16", "bf16")
# Nearly lossless: verified almost as strictly as the float types.
HIGH_BIT = ("q8_0", "q6_k")

# Below this size every quantised type costs more than it saves. Quantised ggml dot products
# round the activations to 8 bits too, and on SmolLM2-135M that alone flips close answers
# (docs/export.md); an f16 file of a sub-billion model is a few hundred MB at most.
SMALL_MODEL_PARAMETERS = 1_000_000_000


def check_quantization(name: str) -> str:
    """The canonical lower-case name, or ConfigError listing the valid ones."""
    canonical = name.strip().lower()
    if canonical not in QUANTIZATIONS:
        raise ConfigError(
            f"Unknown quantization {quoted(name)}.",
            hint=f"Use one of: {', '.join(QUANTIZATIONS)}.",
            quantization=name,
        )
    return canonical


def default_quantization(num_parameters: int) -> str:
    """f16 below a billion parameters, q4_k_m (the size users expect of a 7B) from there up."""
    return "f16" if num_parameters < SMALL_MODEL_PARAMETERS else "q4_k_m"


def safer_quantization(name: str) -> str | None:
    """What to try when `name` fails verification: q8_0 for 4-6 bits, f16 for q8_0; None for
    an unquantised file, where a lower precision cannot help."""
    name = check_quantization(name)
    if name in UNQUANTIZED:
        return None
    return "f16" if name == "q8_0" else "q8_0"


def _quantize_in_this_process(src: Path, dst: Path, quantization: str, threads: int) -> int:
    """llama.cpp's status for writing `dst`; runs in an isolated child (see `quantize_gguf`)."""
    llama_cpp = load_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZATIONS[quantization])
    params.nthread = threads
    # An input that is already quantised is requantised (lossy, but asked for): without the flag
    # llama.cpp fails on it and leaves a partial file.
    params.allow_requantize = True
    return int(
        llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    )


def quantize_gguf(src: Path, dst: Path, quantization: str, threads: int = 0) -> Path:
    """Write `dst` as `src` quantised; on failure raise ConversionError (NativeCrashError if
    llama.cpp crashes) and leave no `dst`.

    `threads` 0 uses every core: quantising is a batch job and its result does not depend on it.
    """
    quantization = check_quantization(quantization)
    with staged(dst) as partial:
        log.info("quantising %s to %s", src.name, quantization)
        status = run_isolated(
            "quantize",
            _quantize_in_this_process,
            src,
            partial,
            quantization,
            threads or os.cpu_count() or 1,
        )
        if status != 0 or not partial.is_file():
            raise ConversionError(
                f"llama.cpp could not quantise {src} to {quantization} (status {status}).",
                hint="Check that the input is a complete GGUF file; llama.cpp logs the cause.",
                source=str(src),
                quantization=quantization,
            )
    return dst
