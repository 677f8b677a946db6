"""Readings -> one safety level, with the reasons a person would want to see.

Thresholds follow what consumer GPUs tolerate: throttling starts in the low 80s C, and a card
whose VRAM is nearly full is one batch away from an OOM. On a CPU-only host, memory pressure is
the risk that matters: past ~92% the kernel starts swapping or OOM-killing the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class Level(IntEnum):
    SAFE = 1
    WARM = 2
    WARNING = 3
    CRITICAL = 4
    EMERGENCY = 5


# upper bounds (exclusive) of safe, warm, warning, critical; at or above the last: emergency
GPU_TEMPERATURE_C = (70.0, 78.0, 85.0, 90.0)
GPU_MEMORY_PERCENT = (80.0, 90.0, 95.0, 98.0)
HOST_MEMORY_PERCENT = (75.0, 85.0, 92.0, 97.0)


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    temperature_c: float
    memory_used_mb: float
    memory_total_mb: float
    power_w: float = 0.0
    power_limit_w: float = 0.0
    utilization_percent: float = 0.0

    @property
    def memory_percent(self) -> float:
        return 100.0 * self.memory_used_mb / self.memory_total_mb if self.memory_total_mb else 0.0


@dataclass(frozen=True)
class HostReading:
    memory_used_mb: float
    memory_total_mb: float
    memory_percent: float
    cpu_percent: float = 0.0


@dataclass(frozen=True)
class Readings:
    source: str  # nvml | host | simulation
    host: HostReading
    gpus: list[GpuReading] = field(default_factory=list)


@dataclass(frozen=True)
class Assessment:
    level: Level
    reasons: list[str]


def level_for(value: float, bounds: tuple[float, float, float, float]) -> Level:
    for level, bound in zip(Level, bounds, strict=False):
        if value < bound:
            return level
    return Level.EMERGENCY


def assess(readings: Readings) -> Assessment:
    checks: list[tuple[Level, str]] = [
        (
            level_for(readings.host.memory_percent, HOST_MEMORY_PERCENT),
            f"host memory {readings.host.memory_percent:.0f}%",
        )
    ]
    for gpu in readings.gpus:
        checks.append(
            (
                level_for(gpu.temperature_c, GPU_TEMPERATURE_C),
                f"GPU {gpu.index} at {gpu.temperature_c:.0f} C",
            )
        )
        checks.append(
            (
                level_for(gpu.memory_percent, GPU_MEMORY_PERCENT),
                f"GPU {gpu.index} VRAM {gpu.memory_percent:.0f}%",
            )
        )
    level = max(check_level for check_level, _ in checks)
    reasons = [reason for check_level, reason in checks if check_level > Level.SAFE]
    return Assessment(level=level, reasons=reasons)
