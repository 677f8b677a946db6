"""The safety gate: what a training run does between two steps at each level the sidecar reports.

The clock is a counter the tests move by hand, so the hysteresis is checked to the second with
no sleeping.
"""

from __future__ import annotations

import pytest

from backpropagate_api.settings import SafetySettings
from backpropagate_api.v1 import common_pb2
from backpropagate_services.safety.levels import (
    GpuReading,
    HostReading,
    Readings,
    Thresholds,
    assess,
)
from backpropagate_services.trainer.runtime.safety_gate import Action, SafetyGate, stop_error

UNSPECIFIED = common_pb2.SAFETY_LEVEL_UNSPECIFIED
SAFE = common_pb2.SAFETY_LEVEL_SAFE
WARM = common_pb2.SAFETY_LEVEL_WARM
WARNING = common_pb2.SAFETY_LEVEL_WARNING
CRITICAL = common_pb2.SAFETY_LEVEL_CRITICAL
EMERGENCY = common_pb2.SAFETY_LEVEL_EMERGENCY

HOT = ["GPU 0 at 91 C (critical at 90 C)"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def gate(clock: Clock) -> SafetyGate:
    return SafetyGate(resume_after_seconds=10.0, clock=clock)


def paused(gate: SafetyGate) -> SafetyGate:
    assert gate.decide(CRITICAL, HOT).action is Action.PAUSE
    return gate


@pytest.mark.parametrize("level", [SAFE, WARM, WARNING])
def test_training_continues_at_warning_and_below(gate: SafetyGate, level: int) -> None:
    decision = gate.decide(level, ["GPU 0 at 85 C (warning at 80 C)"])

    assert decision.action is Action.CONTINUE
    assert not gate.paused


def test_critical_pauses_once_and_says_why_and_when_it_resumes(gate: SafetyGate) -> None:
    first = gate.decide(CRITICAL, HOT)
    second = gate.decide(CRITICAL, HOT)

    assert first.action is Action.PAUSE
    assert first.message == (
        "pausing: GPU 0 at 91 C (critical at 90 C); resuming after 10 s at warning or below"
    )
    assert second.action is Action.WAIT
    assert gate.paused


def test_no_resume_while_still_critical_however_long_it_lasts(
    gate: SafetyGate, clock: Clock
) -> None:
    paused(gate)
    for _ in range(10):
        clock.now += 60
        assert gate.decide(CRITICAL, HOT).action is Action.WAIT


def test_no_resume_before_the_level_stayed_at_warning_or_below_for_the_whole_period(
    gate: SafetyGate, clock: Clock
) -> None:
    paused(gate)

    assert gate.decide(WARNING).action is Action.WAIT  # the calm period starts here
    clock.now += 9.9
    assert gate.decide(SAFE).action is Action.WAIT
    clock.now += 0.1
    resumed = gate.decide(WARM)

    assert resumed.action is Action.RESUME
    assert resumed.message == "resuming: warm for 10 s"
    assert not gate.paused
    assert gate.decide(WARNING).action is Action.CONTINUE


def test_a_critical_reading_during_the_calm_period_starts_it_again(
    gate: SafetyGate, clock: Clock
) -> None:
    paused(gate)
    gate.decide(WARNING)
    clock.now += 8
    assert gate.decide(CRITICAL, HOT).action is Action.WAIT

    clock.now += 1
    gate.decide(WARNING)
    clock.now += 9
    assert gate.decide(WARNING).action is Action.WAIT
    clock.now += 1
    assert gate.decide(WARNING).action is Action.RESUME


def test_without_a_hysteresis_period_the_first_calm_reading_resumes(clock: Clock) -> None:
    gate = paused(SafetyGate(resume_after_seconds=0.0, clock=clock))

    assert gate.decide(WARNING).action is Action.RESUME


def test_a_second_critical_after_resuming_pauses_again(gate: SafetyGate, clock: Clock) -> None:
    paused(gate)
    gate.decide(SAFE)
    clock.now += 10
    assert gate.decide(SAFE).action is Action.RESUME

    assert gate.decide(CRITICAL, HOT).action is Action.PAUSE


@pytest.mark.parametrize("pause_first", [False, True], ids=["running", "paused"])
def test_emergency_stops_the_run_with_the_gpu_temperature_code(
    gate: SafetyGate, pause_first: bool
) -> None:
    if pause_first:
        paused(gate)

    decision = gate.decide(
        EMERGENCY, ["GPU 0 at 96 C (emergency at 95 C)", "host memory 91% (warning at 90%)"]
    )

    assert decision.action is Action.STOP
    assert decision.error is not None
    assert decision.error.code == "RUNTIME_GPU_TEMPERATURE_CRITICAL"
    assert decision.error.message == (
        "Stopped for safety: GPU 0 at 96 C (emergency at 95 C); host memory 91% (warning at 90%)."
    )
    assert "backprop runs resume RUN" in decision.error.hint
    assert not gate.paused


def readings(
    host_percent: float = 10.0, temperature_c: float = 40.0, vram_percent: float = 10.0
) -> Readings:
    return Readings(
        source="replay",
        host=HostReading(memory_used_mb=0.0, memory_total_mb=0.0, memory_percent=host_percent),
        gpus=[
            GpuReading(
                index=0,
                name="Drill GPU",
                temperature_c=temperature_c,
                memory_used_mb=vram_percent * 100,
                memory_total_mb=10_000.0,
            )
        ],
    )


@pytest.mark.parametrize(
    ("emergency", "code"),
    [
        (readings(temperature_c=96.0, host_percent=92.0), "RUNTIME_GPU_TEMPERATURE_CRITICAL"),
        (readings(host_percent=99.0, temperature_c=85.0), "RUNTIME_HOST_MEMORY_CRITICAL"),
        (readings(vram_percent=99.5, temperature_c=91.0), "RUNTIME_GPU_OOM"),
    ],
    ids=["gpu-temperature", "host-memory", "vram"],
)
def test_the_stop_code_names_the_reading_at_emergency_as_the_sidecar_reports_it(
    gate: SafetyGate, emergency: Readings, code: str
) -> None:
    """The sidecar's own reasons (worst first), whatever else is above safe at the time."""
    assessment = assess(emergency, Thresholds.from_settings(SafetySettings()))

    decision = gate.decide(assessment.level.value, assessment.reasons)

    assert decision.action is Action.STOP
    assert decision.error is not None
    assert decision.error.code == code
    assert len(assessment.reasons) == 2


def test_an_emergency_without_a_reason_still_stops_with_a_generic_runtime_failure() -> None:
    error = stop_error([])

    assert error.code == "RUNTIME_FAILED"
    assert error.message == "Stopped for safety: emergency level."
    assert "backprop runs resume RUN" in error.hint


def test_an_unreachable_sidecar_degrades_once_per_outage_and_training_goes_on(
    gate: SafetyGate,
) -> None:
    first_outage = [gate.decide(UNSPECIFIED).action for _ in range(3)]
    back = gate.decide(SAFE).action
    second_outage = [gate.decide(UNSPECIFIED).action for _ in range(2)]

    assert first_outage == [Action.DEGRADED, Action.CONTINUE, Action.CONTINUE]
    assert back is Action.CONTINUE
    assert second_outage == [Action.DEGRADED, Action.CONTINUE]


def test_degraded_says_training_goes_on_without_safety_levels(gate: SafetyGate) -> None:
    assert gate.decide(UNSPECIFIED).message == (
        "the safety sidecar is unreachable: training on without safety levels"
    )


def test_without_a_configured_sidecar_training_just_continues(clock: Clock) -> None:
    gate = SafetyGate(resume_after_seconds=10.0, configured=False, clock=clock)

    assert [gate.decide(UNSPECIFIED).action for _ in range(3)] == [Action.CONTINUE] * 3


def test_a_pause_outlasts_a_sidecar_outage_and_its_calm_period_starts_when_it_is_back(
    gate: SafetyGate, clock: Clock
) -> None:
    paused(gate)
    gate.decide(SAFE)
    clock.now += 9
    away = gate.decide(UNSPECIFIED)
    clock.now += 60

    assert away.action is Action.WAIT
    assert away.message == "paused: the safety sidecar is unreachable"
    assert gate.decide(UNSPECIFIED).action is Action.WAIT
    assert gate.decide(SAFE).action is Action.WAIT  # calm again from here
    clock.now += 10
    assert gate.decide(SAFE).action is Action.RESUME
