"""The portable llama.cpp build: CPU variants chosen at run time, never the crashing AMX one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from llama_cpp import cpu_variants
from llama_cpp.cpu_variants import AMX_VARIANTS, BackendUnavailable, CpuBackend, choose_variant

from backpropagate_api.errors import MissingDependencyError
from backpropagate_services.common.isolation import run_isolated
from backpropagate_services.common.models import smollm2_gguf_path
from backpropagate_services.export.llama_runtime import cpu_backend, load_llama_cpp

pytestmark = pytest.mark.llama

# What the build script builds for x86-64: a baseline for any 64-bit CPU, AVX2 and AVX-512 levels.
PORTABLE_LEVELS = {"x64", "sse42", "haswell", "skylakex", "icelake", "zen4"}
REPOSITORY = Path(__file__).resolve().parents[2]


def test_the_best_supported_variant_is_chosen_but_never_the_amx_one():
    scores = {"x64": 1, "haswell": 40, "zen4": 90, "sapphirerapids": 120, "icelake": 0}

    assert choose_variant(scores) == "zen4"


def test_a_requested_variant_wins_if_this_cpu_supports_it():
    scores = {"x64": 1, "haswell": 40, "zen4": 90}

    assert choose_variant(scores, "haswell") == "haswell"
    with pytest.raises(BackendUnavailable) as caught:
        choose_variant({"x64": 1, "icelake": 0}, "icelake")
    assert caught.value.requested == "icelake"
    assert caught.value.supported == ["x64"]


def test_no_supported_variant_leaves_llama_cpp_without_a_backend():
    with pytest.raises(BackendUnavailable) as caught:
        choose_variant({"haswell": 0, "sapphirerapids": 200})

    assert caught.value.requested is None


def test_the_installed_build_ships_every_cpu_level_as_a_loadable_variant():
    lib_dir = cpu_variants.LIB_DIR
    variants = {path.name[len("libggml-cpu-") : -3] for path in lib_dir.glob("libggml-cpu-*.so")}

    assert variants >= PORTABLE_LEVELS
    # Not one CPU backend compiled for the builder's CPU: that is what crashes elsewhere.
    assert not (lib_dir / "libggml-cpu.so").exists()


def test_the_installed_llama_cpp_registers_its_backend_with_this_repository_s_code():
    """A stale environment (built before a change to the registration) is found here, not in a
    crash: `make setup` reinstalls it."""
    shipped = REPOSITORY / "deploy" / "llama-cpp" / "cpu_variants.py"

    assert Path(cpu_variants.__file__).read_bytes() == shipped.read_bytes()


def registered_backend() -> CpuBackend:
    """`cpu_backend()` in a fresh process: a process registers its backend once."""
    return cpu_backend()


def test_the_variant_the_setting_names_is_the_one_llama_cpp_runs_on(monkeypatch):
    monkeypatch.setenv("BACKPROPAGATE_EXPORT__LLAMA_CPU_VARIANT", "x64")

    assert run_isolated("test", registered_backend).variant == "x64"


def test_a_variant_this_cpu_cannot_run_is_a_setup_error_naming_those_it_can(monkeypatch):
    monkeypatch.setenv("BACKPROPAGATE_EXPORT__LLAMA_CPU_VARIANT", "pentium4")

    with pytest.raises(MissingDependencyError) as caught:
        run_isolated("test", registered_backend)

    assert "'pentium4' is not built or not supported" in caught.value.message
    assert "x64" in caught.value.hint


def scores_choice_and_vocabulary() -> tuple[dict[str, int], CpuBackend, int]:
    """Every variant's score on this CPU, the backend registered, and the vocabulary of a real
    GGUF loaded after it (proof that llama.cpp sees the backend); in a fresh process, since a
    process registers its backend once."""
    llama_cpp = load_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(smollm2_gguf_path()), n_ctx=64, verbose=False)
    vocabulary = llm.n_vocab()
    llm.close()
    return cpu_variants.variant_scores(), cpu_backend(), vocabulary


def test_this_machine_gets_its_fastest_safe_variant_and_llama_cpp_uses_it():
    scores, backend, vocabulary = run_isolated("test", scores_choice_and_vocabulary)
    safe = {name: score for name, score in scores.items() if name not in AMX_VARIANTS}

    assert vocabulary == 49152

    assert backend.variant not in AMX_VARIANTS
    assert backend.score == max(safe.values()) > 0
    assert scores["x64"] > 0  # the baseline runs on any x86-64 CPU
    assert backend.path.is_file()


# What anyone does with the library: no code of ours, no setting of ours. Greedy, so a fresh
# interpreter either answers or fails the same way every time.
PLAIN_LLAMA_CPP = """
import sys
from llama_cpp import Llama

llm = Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, n_threads_batch=1, verbose=False)
print(llm("The capital of France is", max_tokens=4, temperature=0.0)["choices"][0]["text"])
"""


@pytest.mark.model
def test_plain_llama_cpp_in_a_fresh_interpreter_runs_an_exported_gguf(
    smollm2_f16_gguf: Path, tmp_path: Path
):
    env = {name: value for name, value in os.environ.items() if not name.startswith("BACKPROP")}
    # Another directory than the repository's: ggml also looks for backends in the working one.
    plain = subprocess.run(
        [sys.executable, "-c", PLAIN_LLAMA_CPP, str(smollm2_f16_gguf)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert plain.returncode == 0, plain.stderr[-2000:]
    assert plain.stdout.strip()
