"""Backpropagate: fine-tune a LoRA on a JSONL file, export a GGUF, chat with it.

Light on purpose: importing this package never imports torch. With no BACKPROPAGATE_ENDPOINT
set, the services run inside this process the first time they are needed.
"""

from typing import Any

from backpropagate.callbacks import TrainingCallback
from backpropagate.gpu_safety import GPUMonitor, check_gpu_safe
from backpropagate.results import ExportResult, RunResult
from backpropagate.sdk import Trainer
from backpropagate_api.errors import BackpropagateError

TrainingRun = RunResult  # what train() returns, by the name the product's documentation uses

# Imported on first use: they need the export service's packages, which a service image that
# carries the client (dataprep, trainer, safety) does not install.
_LAZY = {
    "register_with_ollama": "backpropagate.ollama",
    "write_ollama_modelfile": "backpropagate.ollama",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'backpropagate' has no attribute {name!r}")


__all__ = [
    "BackpropagateError",
    "ExportResult",
    "GPUMonitor",
    "RunResult",
    "Trainer",
    "TrainingCallback",
    "TrainingRun",
    "check_gpu_safe",
    "register_with_ollama",
    "write_ollama_modelfile",
]
__version__ = "0.1.0"
