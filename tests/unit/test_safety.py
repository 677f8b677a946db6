"""The safety sidecar: readings -> a level with reasons, where readings come from, and the Watch
stream a trainer follows.

Levels are checked exactly at each threshold, because "at or above 92% host memory is critical"
is the rule a reader of `levels.py` should be able to rely on. The Watch stream runs the real
safety servicer in a real gRPC server, fed by the simulation source (the drill mode).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pynvml
import pytest

from backpropagate.connection import Connection
from backpropagate.v1 import common_pb2, safety_pb2
from backpropagate_services.common.errors import ConfigError, MissingDependencyError
from backpropagate_services.common.settings import SafetySettings, Settings
from backpropagate_services.safety.levels import (
    GPU_MEMORY_PERCENT,
    GPU_TEMPERATURE_C,
    HOST_MEMORY_PERCENT,
    GpuReading,
    HostReading,
    Level,
    Readings,
    assess,
)
from backpropagate_services.safety.sources import (
    HostSource,
    NvmlSource,
    SimulationSource,
    make_source,
)
from backpropagate_services.stack import RunningStack, start_stack

CALM_HOST = {"memory_used_mb": 1000.0, "memory_total_mb": 16000.0, "memory_percent": 10.0}


def host(memory_percent: float) -> HostReading:
    return HostReading(memory_used_mb=0.0, memory_total_mb=0.0, memory_percent=memory_percent)


def gpu(temperature_c: float = 40.0, vram_percent: float = 10.0, index: int = 0) -> GpuReading:
    return GpuReading(
        index=index,
        name="Test GPU",
        temperature_c=temperature_c,
        memory_used_mb=vram_percent * 100.0,
        memory_total_mb=10_000.0,
    )


def frame(
    memory_percent: float = 10.0, gpus: list[dict[str, object]] | None = None
) -> dict[str, object]:
    return {"host": {**CALM_HOST, "memory_percent": memory_percent}, "gpus": gpus or []}


def write_frames(path: Path, frames: object) -> Path:
    path.write_text(json.dumps(frames))
    return path


# --- levels ------------------------------------------------------------------------------------


def levels_at_and_below(bounds: tuple[float, ...]) -> list[tuple[float, Level]]:
    """(value, expected level) just below the first bound, then at and just above each bound."""
    above_safe = [Level.WARM, Level.WARNING, Level.CRITICAL, Level.EMERGENCY]
    cases = [(bounds[0] - 0.1, Level.SAFE)]
    for bound, level in zip(bounds, above_safe, strict=True):
        cases += [(bound, level), (bound + 0.1, level)]
    return cases


@pytest.mark.parametrize(("percent", "expected"), levels_at_and_below(HOST_MEMORY_PERCENT))
def test_host_memory_level_changes_exactly_at_each_threshold(
    percent: float, expected: Level
) -> None:
    assert assess(Readings(source="host", host=host(percent))).level == expected


@pytest.mark.parametrize(("temperature", "expected"), levels_at_and_below(GPU_TEMPERATURE_C))
def test_gpu_temperature_level_changes_exactly_at_each_threshold(
    temperature: float, expected: Level
) -> None:
    readings = Readings(source="nvml", host=host(10.0), gpus=[gpu(temperature_c=temperature)])

    assert assess(readings).level == expected


@pytest.mark.parametrize(("percent", "expected"), levels_at_and_below(GPU_MEMORY_PERCENT))
def test_vram_level_changes_exactly_at_each_threshold(percent: float, expected: Level) -> None:
    readings = Readings(source="nvml", host=host(10.0), gpus=[gpu(vram_percent=percent)])

    assert assess(readings).level == expected


def test_the_documented_thresholds() -> None:
    assert HOST_MEMORY_PERCENT == (75.0, 85.0, 92.0, 97.0)
    assert GPU_TEMPERATURE_C == (70.0, 78.0, 85.0, 90.0)
    assert GPU_MEMORY_PERCENT == (80.0, 90.0, 95.0, 98.0)


def test_calm_machine_is_safe_with_no_reasons() -> None:
    assessment = assess(Readings(source="nvml", host=host(10.0), gpus=[gpu()]))

    assert assessment.level == Level.SAFE
    assert assessment.reasons == []


def test_worst_reading_sets_the_level_and_every_reading_above_safe_is_a_reason() -> None:
    readings = Readings(
        source="nvml",
        host=host(80.0),  # warm
        gpus=[gpu(temperature_c=86.0, index=0), gpu(vram_percent=96.0, index=1)],
    )

    assessment = assess(readings)

    assert assessment.level == Level.CRITICAL  # 86 C
    assert assessment.reasons == ["host memory 80%", "GPU 0 at 86 C", "GPU 1 VRAM 96%"]


def test_gpu_with_unknown_total_memory_counts_as_empty_vram() -> None:
    unknown = GpuReading(
        index=0, name="x", temperature_c=40.0, memory_used_mb=5.0, memory_total_mb=0.0
    )

    assert unknown.memory_percent == 0.0
    assert assess(Readings(source="nvml", host=host(10.0), gpus=[unknown])).level == Level.SAFE


# --- sources -----------------------------------------------------------------------------------


def test_simulation_replays_frames_in_order_and_then_holds_the_last(tmp_path: Path) -> None:
    hot_gpu = {"index": 0, "name": "Sim", "temperature_c": 91.0}
    path = write_frames(
        tmp_path / "drill.json",
        [
            frame(10.0),
            frame(88.0),
            frame(10.0, [{**hot_gpu, "memory_used_mb": 1.0, "memory_total_mb": 2.0}]),
        ],
    )
    source = SimulationSource(path)

    readings = [source.read() for _ in range(5)]

    assert [r.host.memory_percent for r in readings] == [10.0, 88.0, 10.0, 10.0, 10.0]
    assert [len(r.gpus) for r in readings] == [0, 0, 1, 1, 1]
    assert readings[2].gpus[0].temperature_c == 91.0
    assert {r.source for r in readings} == {"simulation"}


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        json.dumps([{"gpus": []}]),
        json.dumps([{"host": {**CALM_HOST, "swap_percent": 3.0}}]),
        json.dumps([{"host": CALM_HOST, "gpus": [{"index": 0}]}]),
        json.dumps({"host": CALM_HOST}),
        json.dumps([]),
    ],
    ids=["not-json", "no-host", "unknown-field", "incomplete-gpu", "not-a-list", "no-frames"],
)
def test_bad_simulation_file_is_a_config_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "drill.json"
    path.write_text(content)

    with pytest.raises(ConfigError) as caught:
        SimulationSource(path)

    assert str(path) in caught.value.message


def test_missing_simulation_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        make_source("simulation", tmp_path / "absent.json")

    assert caught.value.context == {"path": str(tmp_path / "absent.json")}


def test_simulation_source_without_a_file_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        make_source("simulation")

    assert "BACKPROPAGATE_SAFETY__SIMULATION_FILE" in caught.value.message


def test_host_source_reports_this_machines_memory() -> None:
    readings = make_source("host").read()

    assert readings.source == "host"
    assert readings.gpus == []
    assert readings.host.memory_total_mb > 0
    assert 0 < readings.host.memory_percent < 100


def nvml_answers() -> bool:
    """Whether an NVIDIA driver answers on this machine (the CI machines have none)."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def test_auto_source_uses_nvml_where_a_driver_answers_and_falls_back_to_host_elsewhere() -> None:
    expected = NvmlSource if nvml_answers() else HostSource

    assert type(make_source("auto")) is expected


def test_nvml_source_fails_where_no_driver_answers_instead_of_falling_back() -> None:
    if nvml_answers():
        assert type(make_source("nvml")) is NvmlSource
        return
    with pytest.raises(MissingDependencyError) as caught:
        make_source("nvml")

    assert "NVML is not available" in caught.value.message


# --- the Watch stream over gRPC ----------------------------------------------------------------


@pytest.fixture
def drill_stack(tmp_path: Path) -> Iterator[RunningStack]:
    drill = write_frames(
        tmp_path / "drill.json",
        [
            frame(10.0),
            frame(86.0),
            frame(10.0, [{"index": 0, "name": "Sim", "temperature_c": 95.0,
                          "memory_used_mb": 100.0, "memory_total_mb": 1000.0}]),
        ],
    )  # fmt: skip
    settings = Settings(
        home=tmp_path / "home", safety=SafetySettings(source="simulation", simulation_file=drill)
    )
    stack = start_stack(settings, ["safety"], "127.0.0.1:0")
    try:
        yield stack
    finally:
        stack.stop(grace=0)


def test_watch_streams_the_drills_levels_in_order_then_holds_the_last(
    drill_stack: RunningStack,
) -> None:
    connection = Connection(addresses={"safety": drill_stack.address}, embedded=False)
    call = connection.safety.Watch(safety_pb2.WatchSafetyRequest(interval_seconds=0.01), timeout=10)
    try:
        snapshots = [snapshot for _, snapshot in zip(range(4), call, strict=False)]
    finally:
        call.cancel()
        connection.close()

    assert [common_pb2.SafetyLevel.Name(s.level) for s in snapshots] == [
        "SAFETY_LEVEL_SAFE",
        "SAFETY_LEVEL_WARNING",
        "SAFETY_LEVEL_EMERGENCY",
        "SAFETY_LEVEL_EMERGENCY",
    ]
    assert {s.source for s in snapshots} == {"simulation"}
    assert [list(s.reasons) for s in snapshots[:3]] == [[], ["host memory 86%"], ["GPU 0 at 95 C"]]
    assert snapshots[2].gpus[0].name == "Sim"
    assert snapshots[1].host.memory_percent == 86.0


def test_snapshot_reads_the_next_frame_through_the_client(drill_stack: RunningStack) -> None:
    connection = Connection(addresses={"safety": drill_stack.address}, embedded=False)
    try:
        first, second = [
            connection.call("safety", connection.safety.Snapshot, safety_pb2.SnapshotRequest())
            for _ in range(2)
        ]
    finally:
        connection.close()

    assert (first.level, second.level) == (
        common_pb2.SAFETY_LEVEL_SAFE,
        common_pb2.SAFETY_LEVEL_WARNING,
    )
    assert first.timestamp > 0
