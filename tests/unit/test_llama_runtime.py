"""The portable llama.cpp build: CPU variants chosen at run time, never the crashing AMX one."""

from __future__ import annotations

from pathlib import Path

import pytest

from backpropagate_services.common.errors import MissingDependencyError
from backpropagate_services.common.isolation import run_isolated
from backpropagate_services.common.models import smollm2_gguf_path
from backpropagate_services.export.llama_runtime import (
    AMX_VARIANTS,
    CpuBackend,
    _variant_scores,
    choose_variant,
    cpu_backend,
    load_llama_cpp,
)

pytestmark = pytest.mark.llama

# What the build script builds for x86-64: a baseline for any 64-bit CPU, AVX2 and AVX-512 levels.
PORTABLE_LEVELS = {"x64", "sse42", "haswell", "skylakex", "icelake", "zen4"}


def test_the_best_supported_variant_is_chosen_but_never_the_amx_one():
    scores = {"x64": 1, "haswell": 40, "zen4": 90, "sapphirerapids": 120, "icelake": 0}

    assert choose_variant(scores) == "zen4"


def test_a_requested_variant_wins_if_this_cpu_supports_it():
    scores = {"x64": 1, "haswell": 40, "zen4": 90}

    assert choose_variant(scores, "haswell") == "haswell"
    with pytest.raises(MissingDependencyError) as caught:
        choose_variant({"x64": 1, "icelake": 0}, "icelake")
    assert "x64" in caught.value.hint


def test_no_supported_variant_is_a_clear_setup_error():
    with pytest.raises(MissingDependencyError) as caught:
        choose_variant({"haswell": 0, "sapphirerapids": 200})

    assert "make setup" in caught.value.hint


def test_the_installed_build_ships_every_cpu_level_as_a_loadable_variant():
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    variants = {path.name[len("libggml-cpu-") : -3] for path in lib_dir.glob("libggml-cpu-*.so")}

    assert variants >= PORTABLE_LEVELS
    # Not one CPU backend compiled for the builder's CPU: that is what crashes elsewhere.
    assert not (lib_dir / "libggml-cpu.so").exists()


def scores_choice_and_vocabulary() -> tuple[dict[str, int], CpuBackend, int]:
    """Every variant's score on this CPU, the backend registered, and the vocabulary of a real
    GGUF loaded after it (proof that llama.cpp sees the backend); in a fresh process, since a
    process registers its backend once."""
    llama_cpp = load_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(smollm2_gguf_path()), n_ctx=64, verbose=False)
    vocabulary = llm.n_vocab()
    llm.close()
    return _variant_scores(Path(llama_cpp.__file__).parent / "lib"), cpu_backend(), vocabulary


def test_this_machine_gets_its_fastest_safe_variant_and_llama_cpp_uses_it():
    scores, backend, vocabulary = run_isolated("test", scores_choice_and_vocabulary)
    safe = {name: score for name, score in scores.items() if name not in AMX_VARIANTS}

    assert vocabulary == 49152

    assert backend.variant not in AMX_VARIANTS
    assert backend.score == max(safe.values()) > 0
    assert scores["x64"] > 0  # the baseline runs on any x86-64 CPU
    assert backend.path.is_file()
