"""Where readings come from: NVML on a GPU machine, host memory otherwise, or a replayed file.

The simulation source exists for drills (what does the trainer do at CRITICAL?) and is named as
such everywhere it appears: in settings, in every snapshot's `source`, in the logs.
"""

from __future__ import annotations

import json
import logging
import threading
from abc import ABC, abstractmethod
from pathlib import Path

import psutil

from backpropagate_services.common.errors import ConfigError, MissingDependencyError
from backpropagate_services.safety.levels import GpuReading, HostReading, Readings

log = logging.getLogger(__name__)


def read_host() -> HostReading:
    memory = psutil.virtual_memory()
    return HostReading(
        memory_used_mb=(memory.total - memory.available) / 2**20,
        memory_total_mb=memory.total / 2**20,
        memory_percent=float(memory.percent),
        cpu_percent=float(psutil.cpu_percent(interval=None)),
    )


class ReadingSource(ABC):
    name: str

    @abstractmethod
    def read(self) -> Readings: ...


class HostSource(ReadingSource):
    name = "host"

    def read(self) -> Readings:
        return Readings(source=self.name, host=read_host())


class NvmlSource(ReadingSource):
    """NVIDIA GPUs through NVML; construction fails where no driver answers."""

    name = "nvml"

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
            self._count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as exc:
            raise MissingDependencyError(f"NVML is not available: {exc}") from exc

    def read(self) -> Readings:
        nvml = self._nvml
        gpus = []
        for index in range(self._count):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
            gpus.append(
                GpuReading(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    temperature_c=float(
                        nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
                    ),
                    memory_used_mb=memory.used / 2**20,
                    memory_total_mb=memory.total / 2**20,
                    power_w=nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
                    power_limit_w=nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0,
                    utilization_percent=float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                )
            )
        return Readings(source=self.name, host=read_host(), gpus=gpus)


class SimulationSource(ReadingSource):
    """Replays readings from a JSON file, one per call, holding the last one: for drills.

    File: a list of {"host": {...HostReading fields}, "gpus": [{...GpuReading fields}]}.
    """

    name = "simulation"

    def __init__(self, path: Path) -> None:
        try:
            frames = json.loads(path.read_text())
            self._frames = [
                Readings(
                    source=self.name,
                    host=HostReading(**frame["host"]),
                    gpus=[GpuReading(**gpu) for gpu in frame.get("gpus", [])],
                )
                for frame in frames
            ]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"Cannot read the safety simulation file {path}: {exc}",
                hint="It must be a JSON list of {'host': {...}, 'gpus': [...]} frames.",
                path=str(path),
            ) from exc
        if not self._frames:
            raise ConfigError(f"The safety simulation file {path} has no frames.")
        self._position = 0
        self._lock = threading.Lock()

    def read(self) -> Readings:
        with self._lock:
            frame = self._frames[min(self._position, len(self._frames) - 1)]
            self._position += 1
            return frame


def make_source(kind: str, simulation_file: Path | None = None) -> ReadingSource:
    if kind == "simulation":
        if simulation_file is None:
            raise ConfigError(
                "The simulation source needs BACKPROPAGATE_SAFETY__SIMULATION_FILE.",
            )
        log.warning("safety readings come from the SIMULATION file %s", simulation_file)
        return SimulationSource(simulation_file)
    if kind == "host":
        return HostSource()
    try:
        return NvmlSource()
    except (MissingDependencyError, ImportError) as exc:
        if kind == "nvml":
            raise
        log.info("no GPU readings (%s); reporting host memory", exc)
        return HostSource()
