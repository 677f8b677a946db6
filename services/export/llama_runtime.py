"""llama.cpp loaded the portable way: the fastest CPU backend this machine runs safely.

`deploy/llama-cpp/build-wheel.sh` builds ggml's CPU backend as loadable modules, one per x86-64
feature level (`libggml-cpu-haswell.so`, `-skylakex`, `-icelake`, `-zen4`, ...), instead of one
library compiled for the builder's CPU with -march=native. Each module exports
`ggml_backend_score()`: 0 when this CPU lacks one of its instructions, else higher for more of
them. We register the best-scoring module, as llama.cpp's own `ggml_backend_load_best` does, with
one difference: the AMX module (`sapphirerapids`) is never chosen unless asked for by name,
because its kernels segfault in `ggml_backend_amx_mul_mat` on the first quantised GGUF on Intel
Sapphire Rapids (docs/export.md, "Portable llama.cpp").

Every llama.cpp user in this code base imports llama_cpp through `load_llama_cpp`, so the
backend is registered before llama.cpp would look for one itself (in the executable's directory
and the working directory, where the modules are not).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from backpropagate_services.common.errors import MissingDependencyError, ModelLoadError

if TYPE_CHECKING:
    import llama_cpp

log = logging.getLogger(__name__)

VARIANT_PREFIX = "libggml-cpu-"
# Modules whose kernels use AMX tiles: they crash on the CPUs that have AMX (see the docstring).
AMX_VARIANTS = frozenset({"sapphirerapids"})
REBUILD_HINT = "Run `make setup`: it builds llama-cpp-python with deploy/llama-cpp/build-wheel.sh."


@dataclass(frozen=True)
class CpuBackend:
    """The CPU backend llama.cpp runs on in this process, for logs and `backprop info`."""

    variant: str
    path: Path
    score: int


def choose_variant(scores: Mapping[str, int], requested: str | None = None) -> str:
    """The variant to load: `requested` if given, else the best supported non-AMX one.

    `scores` maps a variant name to its `ggml_backend_score()` on this CPU (0: unsupported).
    """
    if requested:
        if scores.get(requested, 0) <= 0:
            supported = sorted(name for name, score in scores.items() if score > 0)
            raise MissingDependencyError(
                f"The llama.cpp CPU variant {requested!r} is not built or not supported by "
                "this CPU.",
                hint=f"Use one of {', '.join(supported)}, or unset "
                "BACKPROPAGATE_EXPORT__LLAMA_CPU_VARIANT to choose automatically.",
                variant=requested,
            )
        return requested
    candidates = {name: score for name, score in scores.items() if name not in AMX_VARIANTS}
    best = max(candidates, key=lambda name: candidates[name], default=None)
    if best is None or candidates[best] <= 0:
        raise MissingDependencyError(
            "No llama.cpp CPU backend built here runs on this CPU.", hint=REBUILD_HINT
        )
    return best


def _variant_scores(lib_dir: Path) -> dict[str, int]:
    """Each built variant's score on this CPU, read by loading its module (no code runs but
    the score function, which only reads cpuid)."""
    scores: dict[str, int] = {}
    for module in sorted(lib_dir.glob(f"{VARIANT_PREFIX}*.so")):
        variant = module.name.removeprefix(VARIANT_PREFIX).removesuffix(".so")
        score_function = ctypes.CDLL(str(module)).ggml_backend_score
        score_function.restype = ctypes.c_int
        scores[variant] = int(score_function())
    return scores


def _loaded_copy(lib_dir: Path, name: str) -> Path:
    """The file of library `name` that libllama actually loaded.

    A wheel cannot hold symlinks, so `libggml.so`, `libggml.so.0` and `libggml.so.0.x.y` are
    three copies; libllama loads the one named by its soname. The backend must be registered in
    that copy's registry: loading another copy would register it in a registry nobody reads.
    """
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = Path(line.split()[-1])
        if path.parent == lib_dir and path.name.startswith(name):
            return path
    return lib_dir / name


@cache
def cpu_backend() -> CpuBackend:
    """Register the CPU backend with llama.cpp, once per process, and say which it is.

    The variant is BACKPROPAGATE_EXPORT__LLAMA_CPU_VARIANT when set, else chosen by
    `choose_variant`. MissingDependencyError if llama-cpp-python is missing, or was built without
    runtime CPU variants (a -march=native build that may crash on this CPU).
    """
    from backpropagate_services.common.settings import get_settings

    try:
        import llama_cpp
    except ImportError as exc:
        raise MissingDependencyError(
            f"llama-cpp-python is not installed: {exc}", hint=REBUILD_HINT
        ) from exc
    # llama-cpp-python prints every llama.cpp log line until a model is opened quietly; the
    # chosen backend is logged below, in our own log.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    scores = _variant_scores(lib_dir)
    if not scores:
        raise MissingDependencyError(
            f"llama-cpp-python in {lib_dir} was built without runtime CPU variants: it may use "
            "instructions this CPU lacks, or the AMX kernels that crash on Sapphire Rapids.",
            hint=REBUILD_HINT,
        )
    variant = choose_variant(scores, get_settings().export.llama_cpu_variant)
    module = lib_dir / f"{VARIANT_PREFIX}{variant}.so"
    libggml = ctypes.CDLL(str(_loaded_copy(lib_dir, "libggml.so")))
    libggml.ggml_backend_load.restype = ctypes.c_void_p
    libggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
    if not libggml.ggml_backend_load(str(module).encode()):
        raise MissingDependencyError(f"llama.cpp could not load {module}.", hint=REBUILD_HINT)
    log.info("llama.cpp CPU backend: %s (score %s)", variant, scores[variant])
    return CpuBackend(variant, module, scores[variant])


def load_llama_cpp() -> ModuleType:
    """`import llama_cpp`, with its CPU backend registered first (see `cpu_backend`)."""
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
