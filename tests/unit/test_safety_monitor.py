"""The trainer's SafetyMonitor against a real SafetyService in a real gRPC server, fed by a replay
file: the temperature ramp of a drill reaches the safety gate as pause, then stop; a sidecar that
goes away reads UNSPECIFIED and is followed again when it comes back.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from backpropagate_api.settings import SafetySettings, Settings
from backpropagate_api.v1 import common_pb2
from backpropagate_services.stack import RunningStack, start_stack
from backpropagate_services.trainer.runtime.safety_gate import Action, SafetyGate
from backpropagate_services.trainer.runtime.safety_monitor import SafetyMonitor

INTERVAL = 0.1  # seconds between the sidecar's snapshots
RAMP_C = [70.0, 70.0, *[91.0] * 10, 96.0]  # warm, critical for a second, then emergency

Follow = Callable[[str], SafetyMonitor]


def reading(temperature_c: float) -> str:
    return json.dumps(
        {
            "host": {"memory_used_mb": 1000.0, "memory_total_mb": 16000.0, "memory_percent": 10.0},
            "gpus": [
                {"index": 0, "name": "Drill GPU", "temperature_c": temperature_c,
                 "memory_used_mb": 100.0, "memory_total_mb": 1000.0}
            ],
        }
    )  # fmt: skip


def serve_replay(tmp_path: Path, temperatures: list[float], address: str) -> RunningStack:
    drill = tmp_path / "ramp.jsonl"
    drill.write_text("".join(reading(t) + "\n" for t in temperatures))
    settings = Settings(
        home=tmp_path / "home",
        safety=SafetySettings(source="replay", replay_file=drill, interval_seconds=INTERVAL),
    )
    return start_stack(settings, ["safety"], address)


def wait_until(
    condition: Callable[[], bool], monitor: SafetyMonitor, seconds: float = 10.0
) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        monitor.wait_for_update(timeout=0.5)


def distinct(values: Sequence[object]) -> list[object]:
    """The values without consecutive repeats."""
    return [value for i, value in enumerate(values) if i == 0 or values[i - 1] != value]


@pytest.fixture
def monitor() -> Iterator[Follow]:
    """Starts a monitor following an address; stops every one at the end of the test."""
    monitors: list[SafetyMonitor] = []

    def follow(address: str) -> SafetyMonitor:
        monitors.append(SafetyMonitor(address, interval_seconds=INTERVAL))
        monitors[-1].start()
        return monitors[-1]

    yield follow
    for each in monitors:
        each.stop()


def test_a_temperature_ramp_pauses_the_run_at_critical_and_stops_it_at_emergency(
    tmp_path: Path, monitor: Follow
) -> None:
    stack = serve_replay(tmp_path, RAMP_C, "127.0.0.1:0")
    try:
        safety: SafetyMonitor = monitor(stack.address)
        gate = SafetyGate(resume_after_seconds=10.0)
        levels: list[int] = []
        actions: list[Action] = []
        while not actions or actions[-1] is not Action.STOP:
            assert len(levels) < 100, (levels, actions)
            safety.wait_for_update(timeout=5.0)
            levels.append(safety.level)
            actions.append(gate.decide(safety.level, safety.reasons).action)
        reasons = safety.reasons
        connected = safety.connected
    finally:
        stack.stop(grace=0)

    assert distinct(levels) == [
        common_pb2.SAFETY_LEVEL_WARM,
        common_pb2.SAFETY_LEVEL_CRITICAL,
        common_pb2.SAFETY_LEVEL_EMERGENCY,
    ]
    assert distinct(actions) == [Action.CONTINUE, Action.PAUSE, Action.WAIT, Action.STOP]
    assert reasons == ("GPU 0 at 96 C (emergency at 95 C)",)
    assert connected
    stop = gate.decide(common_pb2.SAFETY_LEVEL_EMERGENCY, reasons)
    assert stop.error is not None
    assert stop.error.code == "RUNTIME_GPU_TEMPERATURE_CRITICAL"


def test_a_lost_sidecar_reads_unspecified_at_once_and_is_followed_again_when_back(
    tmp_path: Path, monitor: Follow
) -> None:
    stack = serve_replay(tmp_path, [91.0], "127.0.0.1:0")
    address = stack.address
    safety: SafetyMonitor = monitor(address)
    wait_until(lambda: safety.level == common_pb2.SAFETY_LEVEL_CRITICAL, safety)
    assert safety.connected

    stack.stop(grace=0)
    wait_until(lambda: not safety.connected, safety, seconds=5.0)

    assert safety.level == common_pb2.SAFETY_LEVEL_UNSPECIFIED
    assert safety.reasons == ()

    stack = serve_replay(tmp_path, [40.0], address)  # the sidecar restarts where it was
    try:
        wait_until(lambda: safety.level == common_pb2.SAFETY_LEVEL_SAFE, safety)
        assert safety.connected
    finally:
        stack.stop(grace=0)


def unused_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def test_a_sidecar_that_never_answers_leaves_the_level_unspecified_and_stop_is_prompt(
    monitor: Follow,
) -> None:
    safety: SafetyMonitor = monitor(unused_address())
    safety.wait_for_update(timeout=5.0)  # the first attempt fails
    time.sleep(1.0)  # into the backoff

    started = time.monotonic()
    safety.stop()

    assert time.monotonic() - started < 1.0
    assert safety.configured
    assert not safety.connected
    assert safety.level == common_pb2.SAFETY_LEVEL_UNSPECIFIED


def test_without_an_endpoint_the_monitor_starts_nothing_and_waits_time_out() -> None:
    safety = SafetyMonitor(None)
    safety.start()

    started = time.monotonic()
    safety.wait_for_update(timeout=0.05)

    assert time.monotonic() - started >= 0.05
    assert not safety.configured
    assert not safety.connected
    assert safety.level == common_pb2.SAFETY_LEVEL_UNSPECIFIED
    safety.stop()
