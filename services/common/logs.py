"""Logging that stamps the current run_id on every line.

A worker wraps a job in `run_context(run_id)`; every log record made inside it (in that thread)
carries the id, so `grep <run_id>` over any service's log finds the whole story of a run.
"""

from __future__ import annotations

import contextvars
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from backpropagate_api.private_files import create_private_file
from backpropagate_api.redaction import redact

_current_run_id: contextvars.ContextVar[str] = contextvars.ContextVar("run_id", default="-")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s run_id=%(run_id)s %(message)s"


def current_run_id() -> str:
    return _current_run_id.get()


@contextmanager
def run_context(run_id: str) -> Iterator[None]:
    token = _current_run_id.set(run_id)
    try:
        yield
    finally:
        _current_run_id.reset(token)


class RunIdFilter(logging.Filter):
    """Adds `run_id` to each record and redacts secrets from its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.run_id = current_run_id()
        # Redact the merged message: a secret may come in the arguments, and redacting the
        # template alone would eat the placeholder after "token=" and break the formatting.
        try:
            message = record.getMessage()
        except Exception:  # a malformed call; the handler reports it as a logging error
            return True
        record.msg, record.args = redact(message), None
        return True


class RedactingFormatter(logging.Formatter):
    """The whole line redacted, the traceback included: an exception's text (a URL with its
    password, a token in a failed request) reaches the log only through here."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def quiet_library_output() -> None:
    """Keep libraries' own progress bars and upstream warnings out of our output.

    Services report progress as events, which the client renders as one rich progress bar;
    tqdm bars from transformers (which read this variable at import) would tear it apart.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Their own stderr handlers would print retries and advice beside ours; errors still show.
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # peft 0.21's get_peft_model calls an API transformers 5.23 deprecates: not ours to fix.
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )


def configure_logging(level: str = "INFO", log_file: Path | None = None) -> None:
    """Idempotent: safe to call from every entry point.

    Servers log to stderr; the embedded stack logs to `log_file` (readable by its owner only),
    because the user's terminal belongs to the progress bar and the results.
    """
    root = logging.getLogger()
    if any(isinstance(f, RunIdFilter) for h in root.handlers for f in h.filters):
        root.setLevel(level)
        return
    handler: logging.Handler
    if log_file is None:
        handler = logging.StreamHandler()
    else:
        handler = logging.FileHandler(create_private_file(log_file), encoding="utf-8")
    handler.addFilter(RunIdFilter())
    handler.setFormatter(RedactingFormatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
