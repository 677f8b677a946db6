"""What the product's documentation shows a user typing works as it shows: the exception names,
the presets, the checkpoint manager, the GPU-safety checks and the backend choice.

The GPU-safety checks read a real safety sidecar (a gRPC server replaying a temperature ramp), and
the embedded default's own readings, as a script would.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backpropagate import BackpropagateError, Trainer
from backpropagate.checkpoints import MANIFEST, CheckpointManager, CheckpointPolicy
from backpropagate.config import get_preset
from backpropagate.gpu_safety import GPUMonitor, GpuSafetyStatus, check_gpu_safe
from backpropagate_api.errors import (
    EXIT_PARTIAL_FAILURE,
    EXIT_RUNTIME_ERROR,
    EXIT_USER_ERROR,
    ConfigError,
    DatasetParseError,
    DatasetValidationError,
    ExportVerificationError,
    GpuNotAvailableError,
    GpuOutOfMemoryError,
    PathOutsideDirectoryError,
)
from backpropagate_api.settings import EndpointSettings, SafetySettings, Settings
from backpropagate_services.stack import RunningStack, start_stack


def test_the_documented_exception_names_are_our_classes_with_the_documented_exit_codes() -> None:
    from backpropagate import exceptions

    # The table of exit codes the product documents: 1 user error, 2 runtime, 3 partial failure.
    documented_exit_codes = {
        "ConfigurationError": EXIT_USER_ERROR,
        "DatasetError": EXIT_USER_ERROR,
        "TrainingError": EXIT_RUNTIME_ERROR,
        "GPUError": EXIT_RUNTIME_ERROR,
        "ExportError": EXIT_RUNTIME_ERROR,
        "BatchOperationError": EXIT_PARTIAL_FAILURE,
    }
    hierarchy = {
        "ConfigurationError": ["InvalidSettingError"],
        "DatasetError": ["DatasetParseError", "DatasetValidationError", "DatasetFormatError"],
        "TrainingError": ["TrainingAbortedError", "CheckpointError"],
        "ExportError": ["LoRAExportError", "GGUFExportError", "MergeExportError"],
        "GPUError": ["GPUNotAvailableError", "GPUMemoryError", "GPUTemperatureError"],
        "SLAOError": ["SLAOMergeError"],
    }
    for name in exceptions.__all__:
        assert issubclass(getattr(exceptions, name), BackpropagateError), name
    for name, exit_code in documented_exit_codes.items():
        assert getattr(exceptions, name).exit_code == exit_code, name
    for family, members in hierarchy.items():
        for member in members:
            assert issubclass(getattr(exceptions, member), getattr(exceptions, family)), member
    # The names are our classes: what the services raise is caught by the documented name.
    assert issubclass(DatasetParseError, exceptions.DatasetError)
    assert issubclass(DatasetValidationError, exceptions.DatasetError)
    assert issubclass(GpuOutOfMemoryError, exceptions.GPUError)
    assert issubclass(GpuNotAvailableError, exceptions.GPUError)
    assert issubclass(ExportVerificationError, exceptions.ExportError)
    assert issubclass(exceptions.OllamaRegistrationError, exceptions.ExportError)
    assert GpuOutOfMemoryError.code == "RUNTIME_GPU_OOM"  # codes unchanged by the new bases
    assert GpuNotAvailableError.exit_code == EXIT_RUNTIME_ERROR


def test_every_documented_preset_is_there_by_name_fast_3b_included() -> None:
    documented = {  # preset: LoRA r, effective batch, learning rate, runs
        "fast-3b": (8, 8, 5e-4, 3),
        "fast": (8, 8, 5e-4, 3),
        "balanced": (16, 16, 2e-4, 5),
        "quality": (32, 32, 1e-4, 10),
    }
    for name, values in documented.items():
        preset = get_preset(name)
        assert (preset.lora_r, preset.batch_size, preset.learning_rate, preset.runs) == values


def test_the_fast_3b_preset_is_a_settings_value_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKPROPAGATE_TRAINING__PRESET", "fast-3b")

    assert Settings().training.preset == "fast-3b"


def _checkpoint(directory: Path, name: str) -> Path:
    path = directory / name
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"weights")
    return path


def test_checkpoint_manager_keeps_the_best_n_and_the_final_and_prunes_the_rest(
    tmp_path: Path,
) -> None:
    policy = CheckpointPolicy(keep_best_n=2, keep_final=True)
    manager = CheckpointManager(tmp_path, policy)
    losses = {1: 0.9, 2: 0.4, 3: 0.7, 4: 0.5, 5: 0.8}
    for run_idx, loss in losses.items():
        manager.register(run_idx, _checkpoint(tmp_path, f"run-{run_idx}"), val_loss=loss)

    removed = manager.prune()

    assert sorted(path.name for path in removed) == ["run-1", "run-3"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["run-2", "run-4", "run-5"]
    # The manifest keeps the list across processes: a new manager goes on with it.
    again = CheckpointManager(tmp_path, policy)
    assert [entry.path for entry in again.entries] == ["run-2", "run-4", "run-5"]
    assert json.loads((tmp_path / MANIFEST).read_text())[0]["val_loss"] == 0.4


def test_checkpoint_manager_keeps_run_boundaries_when_asked(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, CheckpointPolicy(keep_best_n=0, keep_run_boundaries=True))
    for run_idx, step in [(1, 10), (1, 20), (2, 10), (2, 20)]:
        manager.register(run_idx, _checkpoint(tmp_path, f"r{run_idx}-s{step}"), val_loss=1.0)

    manager.prune()

    assert [entry.path for entry in manager.entries] == ["r1-s20", "r2-s20"]


def test_checkpoint_manager_never_reaches_outside_its_directory(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpts")
    elsewhere = _checkpoint(tmp_path, "precious")

    with pytest.raises(PathOutsideDirectoryError):
        manager.register(1, elsewhere, val_loss=0.1)
    assert elsewhere.is_dir()


def _replay(path: Path, temperatures: list[float]) -> Path:
    host = {"memory_used_mb": 1000, "memory_total_mb": 8000, "memory_percent": 12.5}
    lines = [
        {
            "host": host,
            "gpus": [
                {
                    "index": 0,
                    "name": "Replayed GPU",
                    "temperature_c": t,
                    "memory_used_mb": 1000,
                    "memory_total_mb": 16000,
                }
            ],
        }
        for t in temperatures
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture
def overheating_sidecar(tmp_path: Path) -> Iterator[RunningStack]:
    """A real safety service whose GPU warms up to its critical temperature and stays there."""
    replay = _replay(tmp_path / "ramp.jsonl", [60.0, 75.0, 91.0])
    settings = Settings(
        home=tmp_path / "sidecar", safety=SafetySettings(source="replay", replay_file=replay)
    )
    stack = start_stack(settings, ["safety"], "127.0.0.1:0")
    try:
        yield stack
    finally:
        stack.stop(grace=0)


def test_check_gpu_safe_and_gpu_monitor_read_the_sidecar_as_the_trainer_does(
    tmp_path: Path, overheating_sidecar: RunningStack
) -> None:
    settings = Settings(
        home=tmp_path / "client",
        endpoints=EndpointSettings(safety=overheating_sidecar.address),
    )

    first = check_gpu_safe(settings)
    readings: list[GpuSafetyStatus] = []
    unsafe: list[GpuSafetyStatus] = []
    with GPUMonitor(0.05, on_status=readings.append, on_unsafe=unsafe.append, settings=settings):
        deadline = time.monotonic() + 10
        while not unsafe and time.monotonic() < deadline:
            time.sleep(0.05)

    assert first and first.level == "safe" and first.source == "replay"
    assert [status.level for status in readings[:2]] == ["warm", "critical"]
    assert not unsafe[0] and "91" in " ".join(unsafe[0].reasons)


def test_check_gpu_safe_reads_this_machine_in_the_embedded_default(tmp_path: Path) -> None:
    status = check_gpu_safe(Settings(home=tmp_path, safety=SafetySettings(source="host")))

    assert status.source == "host" and status.snapshot.host.memory_total_mb > 0
    assert not (tmp_path / "logs").exists()  # nothing was started


def test_the_mlx_backend_is_refused_with_what_to_use_instead() -> None:
    with pytest.raises(
        ConfigError, match="MLX \\(Apple Silicon\\) training is not offered"
    ) as info:
        Trainer(backend="mlx")

    assert "Leave --backend out" in info.value.hint
    assert Trainer(backend="auto").model == ""
