"""The fastest CPU backend this machine runs safely, registered whenever `llama_cpp` is imported.

deploy/llama-cpp/build-wheel.sh builds ggml's CPU backend as loadable modules, one per x86-64
feature level (`libggml-cpu-haswell.so`, `-skylakex`, `-icelake`, `-zen4`, ...), and adds this
module to the llama-cpp-python wheel it builds, called from `llama_cpp/__init__.py`. Without it
the library works with nothing: llama-cpp-python never loads a backend module itself (it does
not call `ggml_backend_load_all`, and ggml would only look beside the Python executable and in the
working directory anyway), so every GGUF fails with "Failed to load model from file".

Each module exports `ggml_backend_score()`: 0 when this CPU lacks one of its instructions, else
higher for more of them. The best-scoring module is registered, as ggml's own
`ggml_backend_load_best` does, with one difference: the AMX module (`sapphirerapids`) is never
chosen unless asked for by name, because its kernels segfault in `ggml_backend_amx_mul_mat` on
the first quantised GGUF on Intel Sapphire Rapids (backpropagate's docs/export.md, "Portable
llama.cpp"). BACKPROPAGATE_EXPORT__LLAMA_CPU_VARIANT=haswell (say) asks for one by name.

It imports nothing but the standard library, so the library works on its own in any environment
the wheel is installed in.
"""

from __future__ import annotations

import _ctypes
import ctypes
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

LIB_DIR = Path(__file__).parent / "lib"
VARIANT_PREFIX = "libggml-cpu-"
# Modules whose kernels use AMX tiles: they crash on the CPUs that have AMX (see the docstring).
AMX_VARIANTS = frozenset({"sapphirerapids"})
REQUEST_VARIABLE = "BACKPROPAGATE_EXPORT__LLAMA_CPU_VARIANT"


class BackendUnavailable(RuntimeError):
    """No CPU backend could be registered. `requested`: the variant asked for, when that
    request is what failed (None otherwise); `supported`: the variants this CPU runs."""

    def __init__(self, message: str, requested: str | None, supported: list[str]) -> None:
        super().__init__(message)
        self.requested = requested
        self.supported = supported


@dataclass(frozen=True)
class CpuBackend:
    """The CPU backend llama.cpp runs on in this process, for logs and reports."""

    variant: str
    path: Path
    score: int


def variant_scores(lib_dir: Path = LIB_DIR) -> dict[str, int]:
    """Each built variant's score on this CPU, read by loading its module: no code runs but the
    score function, which only reads cpuid. The modules are unloaded again."""
    scores: dict[str, int] = {}
    for module in sorted(lib_dir.glob(f"{VARIANT_PREFIX}*.so")):
        variant = module.name.removeprefix(VARIANT_PREFIX).removesuffix(".so")
        library = ctypes.CDLL(str(module))
        score_function = library.ggml_backend_score
        score_function.restype = ctypes.c_int
        scores[variant] = int(score_function())
        _ctypes.dlclose(library._handle)
    return scores


def choose_variant(scores: Mapping[str, int], requested: str | None = None) -> str:
    """The variant to load: `requested` if given, else the best supported non-AMX one.

    `scores` maps a variant name to its `ggml_backend_score()` on this CPU (0: unsupported).
    """
    supported = sorted(name for name, score in scores.items() if score > 0)
    if requested:
        if requested not in supported:
            raise BackendUnavailable(
                f"The llama.cpp CPU variant {requested!r} is not built or not supported by "
                "this CPU.",
                requested,
                supported,
            )
        return requested
    candidates = [name for name in supported if name not in AMX_VARIANTS]
    if not candidates:
        raise BackendUnavailable(
            "No llama.cpp CPU backend built here runs on this CPU.", requested, supported
        )
    return max(candidates, key=lambda name: scores[name])


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
def registered(lib_dir: Path = LIB_DIR) -> CpuBackend | None:
    """Register the CPU backend with llama.cpp, once per process, and say which it is.

    The variant is BACKPROPAGATE_EXPORT__LLAMA_CPU_VARIANT when set, else chosen by
    `choose_variant`. None for a build without loadable CPU variants (its CPU backend is built
    in); BackendUnavailable when no variant can be registered.
    """
    scores = variant_scores(lib_dir)
    if not scores:
        return None
    variant = choose_variant(scores, os.environ.get(REQUEST_VARIABLE) or None)
    module = lib_dir / f"{VARIANT_PREFIX}{variant}.so"
    libggml = ctypes.CDLL(str(_loaded_copy(lib_dir, "libggml.so")))
    libggml.ggml_backend_load.restype = ctypes.c_void_p
    libggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
    # ggml announces every backend it loads; importing a library should print nothing.
    llama_log = logging.getLogger("llama-cpp-python")
    level = llama_log.level
    llama_log.setLevel(logging.ERROR)
    try:
        loaded = libggml.ggml_backend_load(str(module).encode())
    finally:
        llama_log.setLevel(level)
    if not loaded:
        raise BackendUnavailable(f"llama.cpp could not load {module}.", None, [])
    return CpuBackend(variant, module, scores[variant])


def register_at_import() -> None:
    """`registered()`, with a warning instead of an error: `import llama_cpp` must work whatever
    the machine, and a model load then fails with llama.cpp's own message."""
    try:
        registered()
    except BackendUnavailable as problem:
        warnings.warn(f"{problem} No CPU backend is registered.", RuntimeWarning, stacklevel=3)
