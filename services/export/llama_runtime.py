"""llama.cpp loaded the portable way: the fastest CPU backend this machine runs safely.

`deploy/llama-cpp/build-wheel.sh` builds ggml's CPU backend as loadable modules, one per x86-64
feature level, instead of one library compiled for the builder's CPU with -march=native, and
adds `llama_cpp.cpu_variants` to the wheel: `import llama_cpp` registers the best module this CPU
runs, never the AMX one that segfaults on Sapphire Rapids (that module's docstring says how).
The library therefore works on its own; this module turns what that registration found into our
errors and settings, and opens GGUF files the way every export stage does.
"""

from __future__ import annotations

import logging
import os
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from backpropagate_api.errors import MissingDependencyError, ModelLoadError

if TYPE_CHECKING:
    import llama_cpp
    from llama_cpp.cpu_variants import CpuBackend

log = logging.getLogger(__name__)

REBUILD_HINT = "Run `make setup`: it builds llama-cpp-python with deploy/llama-cpp/build-wheel.sh."


@cache
def cpu_backend() -> CpuBackend:
    """The CPU backend llama.cpp runs on in this process, registered by `import llama_cpp`.

    The variant is BACKPROPAGATE_EXPORT__LLAMA_CPU_VARIANT when set (in the environment or
    .env), else the best one for this CPU. MissingDependencyError if llama-cpp-python is missing
    or was not built by build-wheel.sh (a -march=native build may crash on this CPU), or if the
    variant asked for does not run here.
    """
    from backpropagate_api.settings import get_settings

    requested = get_settings().export.llama_cpu_variant
    if requested and "llama_cpp" not in sys.modules:
        # The registration reads the environment when llama_cpp is imported; .env is ours.
        os.environ["BACKPROPAGATE_EXPORT__LLAMA_CPU_VARIANT"] = requested
    try:
        from llama_cpp import cpu_variants  # importing llama_cpp registers the backend
    except ImportError as exc:
        raise MissingDependencyError(
            f"llama-cpp-python is not installed, or not the portable build: {exc}",
            hint=REBUILD_HINT,
        ) from exc
    # llama-cpp-python prints every llama.cpp log line until a model is opened quietly; the
    # chosen backend is logged below, in our own log.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    try:
        backend = cpu_variants.registered()
    except cpu_variants.BackendUnavailable as exc:
        hint = REBUILD_HINT
        if exc.requested:
            hint = (
                f"Use one of {', '.join(exc.supported)}, or unset "
                "BACKPROPAGATE_EXPORT__LLAMA_CPU_VARIANT to choose automatically."
            )
        raise MissingDependencyError(str(exc), hint=hint, variant=exc.requested) from None
    if backend is None:
        raise MissingDependencyError(
            f"llama-cpp-python in {cpu_variants.LIB_DIR} was built without runtime CPU variants: "
            "it may use instructions this CPU lacks, or the AMX kernels that crash on Sapphire "
            "Rapids.",
            hint=REBUILD_HINT,
        )
    if requested and backend.variant != requested:
        raise MissingDependencyError(
            f"llama.cpp already runs on the {backend.variant} CPU backend in this process: "
            f"llama_cpp was imported before BACKPROPAGATE_EXPORT__LLAMA_CPU_VARIANT={requested} "
            "was read.",
            hint="Set the variable in the environment of the process, not only in .env.",
            variant=requested,
        )
    log.info("llama.cpp CPU backend: %s (score %s)", backend.variant, backend.score)
    return backend


def load_llama_cpp() -> ModuleType:
    """`import llama_cpp`, checked: its CPU backend registered, as the settings ask (see
    `cpu_backend`)."""
    cpu_backend()
    import llama_cpp

    return llama_cpp


def open_gguf(
    gguf_path: Path,
    *,
    n_ctx: int,
    threads: int,
    lora_path: Path | None = None,
    logits_all: bool = False,
) -> llama_cpp.Llama:
    """A GGUF loaded in llama.cpp (with the GGUF adapter `lora_path` applied, if given), quiet.

    Both thread counts are set: `n_threads_batch` defaults to every core, and on a small machine
    whose other cores are busy that runs several times slower than one thread. ModelLoadError
    for a file llama.cpp cannot load.
    """
    llama = load_llama_cpp()
    try:
        return llama.Llama(
            model_path=str(gguf_path),
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            lora_path=None if lora_path is None else str(lora_path),
            logits_all=logits_all,
            verbose=False,
        )
    except ValueError as exc:  # llama-cpp-python's way of saying the file did not load
        raise ModelLoadError(
            f"llama.cpp could not load {gguf_path.name}: {exc}", gguf=str(gguf_path)
        ) from None
