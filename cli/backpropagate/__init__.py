"""Backpropagate: fine-tune a LoRA on a JSONL file, export a GGUF, chat with it.

Light on purpose: importing this package never imports torch. With no BACKPROPAGATE_ENDPOINT
set, the services run inside this process the first time they are needed.
"""

from backpropagate.results import ExportResult, RunResult
from backpropagate.sdk import Trainer
from backpropagate_services.common.errors import BackpropagateError

__all__ = ["BackpropagateError", "ExportResult", "RunResult", "Trainer"]
__version__ = "0.1.0"
