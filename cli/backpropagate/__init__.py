"""Backpropagate: fine-tune a LoRA on a JSONL file, export a GGUF, chat with it.

Light on purpose: importing this package never imports torch. With no BACKPROPAGATE_ENDPOINT
set, the services run inside this process the first time they are needed.
"""

from backpropagate.ollama import register_with_ollama, write_ollama_modelfile
from backpropagate.results import ExportResult, RunResult
from backpropagate.sdk import Trainer
from backpropagate_services.common.errors import BackpropagateError

__all__ = [
    "BackpropagateError",
    "ExportResult",
    "RunResult",
    "Trainer",
    "register_with_ollama",
    "write_ollama_modelfile",
]
__version__ = "0.1.0"
