"""The safety sidecar: readings -> a level with reasons, the thresholds it uses, where readings
come from, and the Watch stream a trainer follows.

Levels are checked exactly at each threshold, because "at or above 90 C the GPU is critical" is
the rule a reader of the settings should be able to rely on. The Watch stream runs the real
safety servicer in a real gRPC server, fed by the replay source (the drill mode).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pydantic
import pynvml
import pytest

from backpropagate.connection import Connection
from backpropagate_api.errors import ConfigError, MissingDependencyError
from backpropagate_api.settings import SafetySettings, Settings, get_settings
from backpropagate_api.v1 import common_pb2, safety_pb2
from backpropagate_services.safety.levels import (
    Assessment,
    Bands,
    GpuReading,
    HostReading,
    Level,
    Readings,
    Thresholds,
    assess,
)
from backpropagate_services.safety.sources import HostSource, NvmlSource, ReplaySource, make_source
from backpropagate_services.stack import RunningStack, start_stack

DEFAULTS = Thresholds.from_settings(SafetySettings())
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


def line(memory_percent: float = 10.0, temperature_c: float | None = None) -> dict[str, object]:
    """One replay line: host memory, and one GPU at `temperature_c` if given."""
    gpus = [] if temperature_c is None else [
        {"index": 0, "name": "Drill GPU", "temperature_c": temperature_c,
         "memory_used_mb": 100.0, "memory_total_mb": 1000.0}
    ]  # fmt: skip
    return {"host": {**CALM_HOST, "memory_percent": memory_percent}, "gpus": gpus}


def write_replay(path: Path, lines: list[dict[str, object] | str]) -> Path:
    """A JSONL replay file; strings are written as they are (blank or broken lines)."""
    path.write_text(
        "".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in lines)
    )
    return path


# --- thresholds --------------------------------------------------------------------------------


def test_the_default_thresholds() -> None:
    assert DEFAULTS.gpu_temperature_c == Bands(warm=70, warning=80, critical=90, emergency=95)
    assert DEFAULTS.vram_percent == Bands(warm=80, warning=90, critical=95, emergency=99)
    assert DEFAULTS.host_memory_percent == Bands(warm=80, warning=90, critical=95, emergency=98)


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No BACKPROPAGATE_* variable and no .env file, and no cached settings either side."""
    for name in os.environ:
        if name.startswith("BACKPROPAGATE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.usefixtures("clean_environment")
def test_thresholds_are_set_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKPROPAGATE_SAFETY__GPU_TEMPERATURE_CRITICAL_C", "86")
    monkeypatch.setenv("BACKPROPAGATE_SAFETY__HOST_MEMORY_EMERGENCY_PERCENT", "97.5")

    thresholds = Thresholds.from_settings(get_settings().safety)

    assert thresholds.gpu_temperature_c == Bands(70, 80, 86, 95)
    assert thresholds.host_memory_percent == Bands(80, 90, 95, 97.5)
    readings = Readings(source="nvml", host=host(10.0), gpus=[gpu(temperature_c=87.0)])
    assert assess(readings, thresholds).reasons == ["GPU 0 at 87 C (critical at 86 C)"]


@pytest.mark.usefixtures("clean_environment")
@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("GPU_TEMPERATURE_WARNING_C", "92", "GPU_TEMPERATURE_*"),  # above critical (90)
        ("VRAM_EMERGENCY_PERCENT", "95", "VRAM_*"),  # equal to critical
        ("HOST_MEMORY_WARM_PERCENT", "91", "HOST_MEMORY_*"),  # above warning (90)
    ],
)
def test_thresholds_that_do_not_rise_are_a_config_error_naming_the_variables(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, named: str
) -> None:
    monkeypatch.setenv(f"BACKPROPAGATE_SAFETY__{variable}", value)

    with pytest.raises(ConfigError) as caught:
        get_settings()

    assert f"BACKPROPAGATE_SAFETY__{named} thresholds must rise" in caught.value.message
    assert "warm < warning < critical < emergency" in caught.value.message


def test_settings_built_in_code_check_the_order_too() -> None:
    with pytest.raises(pydantic.ValidationError, match="thresholds must rise"):
        SafetySettings(gpu_temperature_emergency_c=90.0)


# --- levels ------------------------------------------------------------------------------------


def levels_at_and_below(bands: Bands) -> list[tuple[float, Level]]:
    """(value, expected level) just below the first threshold, then at and above each one."""
    above_safe = [Level.WARM, Level.WARNING, Level.CRITICAL, Level.EMERGENCY]
    cases = [(bands.warm - 0.1, Level.SAFE)]
    for bound, level in zip(bands, above_safe, strict=True):
        cases += [(bound, level), (bound + 0.1, level)]
    return cases


@pytest.mark.parametrize(("percent", "expected"), levels_at_and_below(DEFAULTS.host_memory_percent))
def test_host_memory_level_changes_exactly_at_each_threshold(
    percent: float, expected: Level
) -> None:
    assert assess(Readings(source="host", host=host(percent)), DEFAULTS).level == expected


@pytest.mark.parametrize(
    ("temperature", "expected"), levels_at_and_below(DEFAULTS.gpu_temperature_c)
)
def test_gpu_temperature_level_changes_exactly_at_each_threshold(
    temperature: float, expected: Level
) -> None:
    readings = Readings(source="nvml", host=host(10.0), gpus=[gpu(temperature_c=temperature)])

    assert assess(readings, DEFAULTS).level == expected


@pytest.mark.parametrize(("percent", "expected"), levels_at_and_below(DEFAULTS.vram_percent))
def test_vram_level_changes_exactly_at_each_threshold(percent: float, expected: Level) -> None:
    readings = Readings(source="nvml", host=host(10.0), gpus=[gpu(vram_percent=percent)])

    assert assess(readings, DEFAULTS).level == expected


def test_calm_machine_is_safe_with_no_reasons() -> None:
    assessment = assess(Readings(source="nvml", host=host(10.0), gpus=[gpu()]), DEFAULTS)

    assert assessment.level == Level.SAFE
    assert assessment.reasons == []


def test_worst_reading_sets_the_level_and_reasons_come_worst_first_with_their_threshold() -> None:
    readings = Readings(
        source="nvml",
        host=host(85.0),  # warm
        gpus=[gpu(temperature_c=91.0, index=0), gpu(vram_percent=96.0, index=1)],  # critical
    )

    assessment = assess(readings, DEFAULTS)

    assert assessment.level == Level.CRITICAL
    assert assessment.reasons == [
        "GPU 0 at 91 C (critical at 90 C)",
        "GPU 1 VRAM 96% (critical at 95%)",
        "host memory 85% (warm at 80%)",
    ]


def test_gpu_with_unknown_total_memory_counts_as_empty_vram() -> None:
    unknown = GpuReading(
        index=0, name="x", temperature_c=40.0, memory_used_mb=5.0, memory_total_mb=0.0
    )

    assert unknown.memory_percent == 0.0
    readings = Readings(source="nvml", host=host(10.0), gpus=[unknown])
    assert assess(readings, DEFAULTS).level == Level.SAFE


# --- sources -----------------------------------------------------------------------------------


def test_replay_plays_one_line_per_read_skipping_blank_lines_and_then_holds_the_last(
    tmp_path: Path,
) -> None:
    path = write_replay(
        tmp_path / "drill.jsonl", [line(10.0), "", line(91.0), "   ", line(10.0, 96.0)]
    )
    source = ReplaySource(path)

    readings = [source.read() for _ in range(5)]

    assert [r.host.memory_percent for r in readings] == [10.0, 91.0, 10.0, 10.0, 10.0]
    assert [len(r.gpus) for r in readings] == [0, 0, 1, 1, 1]
    assert readings[2].gpus[0] == GpuReading(
        index=0, name="Drill GPU", temperature_c=96.0, memory_used_mb=100.0, memory_total_mb=1000.0
    )
    assert {r.source for r in readings} == {"replay"}


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ("not json", "Invalid JSON"),
        (json.dumps({"gpus": []}), "host: Field required"),
        (json.dumps({"host": {**CALM_HOST, "swap_percent": 3.0}}), "host.swap_percent"),
        (json.dumps({"host": CALM_HOST, "gpus": [{"index": 0}]}), "gpus.0.temperature_c"),
        (json.dumps({"host": CALM_HOST, "gpu": []}), "gpu: Extra inputs"),
        (json.dumps({"host": {**CALM_HOST, "memory_percent": "high"}}), "host.memory_percent"),
        (json.dumps([CALM_HOST]), "Input should be"),
    ],
    ids=["not-json", "no-host", "unknown-field", "incomplete-gpu", "misspelt-gpus",
         "not-a-number", "not-an-object"],
)  # fmt: skip
def test_bad_replay_line_is_a_config_error_naming_the_file_and_the_line(
    tmp_path: Path, bad_line: str, problem: str
) -> None:
    path = write_replay(tmp_path / "drill.jsonl", [line(), "", bad_line, line()])

    with pytest.raises(ConfigError) as caught:
        ReplaySource(path)

    assert caught.value.message.startswith(f"{path}, line 3: ")
    assert problem in caught.value.message
    assert caught.value.context == {"path": str(path), "line": "3"}


def test_replay_file_without_readings_is_a_config_error(tmp_path: Path) -> None:
    path = write_replay(tmp_path / "drill.jsonl", ["", "  "])

    with pytest.raises(ConfigError, match="has no readings"):
        ReplaySource(path)


def test_missing_replay_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        make_source("replay", tmp_path / "absent.jsonl")

    assert caught.value.context == {"path": str(tmp_path / "absent.jsonl")}


def test_replay_source_without_a_file_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        make_source("replay")

    assert "BACKPROPAGATE_SAFETY__REPLAY_FILE" in caught.value.message


def test_replay_source_says_in_the_log_that_its_readings_are_a_replay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_replay(tmp_path / "drill.jsonl", [line()])

    with caplog.at_level(logging.WARNING, logger="backpropagate_services.safety.sources"):
        make_source("replay", path)

    assert f"safety readings are REPLAYED from {path} (a drill)" in caplog.text


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


GIB = 2**30
UNSUPPORTED_ON_CONSUMER_GPUS = (
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetEnforcedPowerLimit",
    "nvmlDeviceGetUtilizationRates",
)


def not_supported(*_: object) -> None:
    raise pynvml.NVMLError_NotSupported()


def nvml_gpu(
    monkeypatch: pytest.MonkeyPatch,
    *,
    temperature_c: int,
    vram_used_gib: float,
    unsupported: tuple[str, ...] = UNSUPPORTED_ON_CONSUMER_GPUS,
) -> None:
    """NVML answering as one 12 GiB GPU whose `unsupported` queries answer NotSupported, as
    many consumer and virtualised GPUs do for power and utilisation. pynvml's own functions are
    replaced: this machine has no GPU to ask."""
    answers = {
        "nvmlInit": lambda: None,
        "nvmlDeviceGetCount": lambda: 1,
        "nvmlDeviceGetHandleByIndex": lambda index: index,
        "nvmlDeviceGetName": lambda handle: "NVIDIA GeForce RTX 3060",
        "nvmlDeviceGetTemperature": lambda handle, sensor: temperature_c,
        "nvmlDeviceGetMemoryInfo": lambda handle: SimpleNamespace(
            used=int(vram_used_gib * GIB), total=12 * GIB
        ),
    }
    for name, answer in answers.items():
        monkeypatch.setattr(pynvml, name, answer)
    for name in unsupported:
        monkeypatch.setattr(pynvml, name, not_supported)


def test_a_gpu_without_power_or_utilisation_readings_reports_the_rest_and_keeps_its_level(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nvml_gpu(monkeypatch, temperature_c=91, vram_used_gib=6.0)

    readings = NvmlSource().read()

    (reading,) = readings.gpus
    assert reading.name == "NVIDIA GeForce RTX 3060"
    assert (reading.temperature_c, reading.memory_used_mb, reading.memory_total_mb) == (
        91.0,
        6144.0,
        12288.0,
    )
    assert (reading.power_w, reading.power_limit_w, reading.utilization_percent) == (
        None,
        None,
        None,
    )
    assert assess(readings, DEFAULTS) == Assessment(
        Level.CRITICAL, ["GPU 0 at 91 C (critical at 90 C)"]
    )


def test_a_gpu_without_a_temperature_sensor_is_assessed_on_its_vram(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nvml_gpu(
        monkeypatch,
        temperature_c=0,
        vram_used_gib=11.0,
        unsupported=(*UNSUPPORTED_ON_CONSUMER_GPUS, "nvmlDeviceGetTemperature"),
    )

    readings = NvmlSource().read()

    assert readings.gpus[0].temperature_c is None
    assert assess(readings, DEFAULTS) == Assessment(
        Level.WARNING, ["GPU 0 VRAM 92% (warning at 90%)"]
    )


def test_the_sidecar_leaves_readings_a_gpu_does_not_report_unset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    nvml_gpu(monkeypatch, temperature_c=91, vram_used_gib=6.0)
    safety = SafetySettings(source="nvml")
    stack = start_stack(Settings(home=tmp_path / "home", safety=safety), ["safety"], "127.0.0.1:0")
    connection = Connection(addresses={"safety": stack.address}, embedded=False)
    try:
        snapshot = connection.call(
            "safety", connection.safety.Snapshot, safety_pb2.SnapshotRequest()
        )
    finally:
        connection.close()
        stack.stop(grace=0)

    assert (snapshot.source, snapshot.level) == ("nvml", common_pb2.SAFETY_LEVEL_CRITICAL)
    (reading,) = snapshot.gpus
    assert reading.HasField("temperature_c") and reading.temperature_c == 91.0
    assert not any(
        reading.HasField(name) for name in ("power_w", "power_limit_w", "utilization_percent")
    )


# --- the Watch stream over gRPC ----------------------------------------------------------------


def replay_stack(
    tmp_path: Path, lines: list[dict[str, object] | str], **thresholds: float
) -> RunningStack:
    drill = write_replay(tmp_path / "drill.jsonl", lines)
    safety = SafetySettings(source="replay", replay_file=drill, **thresholds)
    return start_stack(Settings(home=tmp_path / "home", safety=safety), ["safety"], "127.0.0.1:0")


@pytest.fixture
def drill_stack(tmp_path: Path) -> Iterator[RunningStack]:
    stack = replay_stack(tmp_path, [line(10.0), line(91.0), line(10.0, 96.0)])
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
    assert {s.source for s in snapshots} == {"replay"}
    assert [list(s.reasons) for s in snapshots[:3]] == [
        [],
        ["host memory 91% (warning at 90%)"],
        ["GPU 0 at 96 C (emergency at 95 C)"],
    ]
    assert snapshots[2].gpus[0].name == "Drill GPU"
    assert snapshots[1].host.memory_percent == 91.0


def test_snapshot_reads_the_next_line_through_the_client(drill_stack: RunningStack) -> None:
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


def test_the_sidecar_assesses_with_the_configured_thresholds(tmp_path: Path) -> None:
    stack = replay_stack(tmp_path, [line(10.0, 96.0)], gpu_temperature_emergency_c=98.0)
    connection = Connection(addresses={"safety": stack.address}, embedded=False)
    try:
        snapshot = connection.call(
            "safety", connection.safety.Snapshot, safety_pb2.SnapshotRequest()
        )
    finally:
        connection.close()
        stack.stop(grace=0)

    assert snapshot.level == common_pb2.SAFETY_LEVEL_CRITICAL
    assert list(snapshot.reasons) == ["GPU 0 at 96 C (critical at 90 C)"]


# --- docs/safety.md ----------------------------------------------------------------------------

SAFETY_DOC = Path(__file__).resolve().parents[2] / "docs" / "safety.md"


def test_the_documented_thresholds_are_the_settings_defaults() -> None:
    documented = {
        name.lower(): float(value)
        for name, value in re.findall(r"`([A-Z_]+)` ([\d.]+)", SAFETY_DOC.read_text())
    }
    settings = SafetySettings()

    assert documented == {name: getattr(settings, name) for name in documented}
    assert len(documented) == sum(len(bands) for bands in settings.thresholds().values())


def test_the_documented_drill_replays_warm_then_critical_then_emergency(tmp_path: Path) -> None:
    (drill,) = re.findall(r"```jsonl\n(.*?)```", SAFETY_DOC.read_text(), flags=re.DOTALL)
    source = ReplaySource(write_replay(tmp_path / "ramp.jsonl", [drill]))

    levels = [assess(source.read(), DEFAULTS).level for _ in range(4)]

    assert levels == [Level.WARM, Level.CRITICAL, Level.EMERGENCY, Level.EMERGENCY]


@pytest.mark.parametrize("interval", [-1.0, math.inf, math.nan, 3600.0])
def test_a_watch_interval_that_would_wedge_or_break_the_stream_is_refused(
    drill_stack: RunningStack, interval: float
) -> None:
    connection = Connection(addresses={"safety": drill_stack.address}, embedded=False)
    try:
        with pytest.raises(ConfigError) as refused:
            list(
                connection.stream(
                    "safety",
                    connection.safety.Watch,
                    safety_pb2.WatchSafetyRequest(interval_seconds=interval),
                )
            )
        # The server goes on answering.
        snapshot = connection.call(
            "safety", connection.safety.Snapshot, safety_pb2.SnapshotRequest()
        )
    finally:
        connection.close()

    assert refused.value.code == "INPUT_CONFIG_INVALID"
    assert refused.value.context["fields"] == "interval_seconds"
    assert snapshot.source == "replay"
