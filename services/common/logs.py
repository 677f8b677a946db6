"""Logging that stamps the current run_id (and trace) on every line.

A worker wraps a job in `run_context(run_id)`; every log record made inside it (in that thread)
carries the id, so `grep <run_id>` over any service's log finds the whole story of a run. The
span the job runs in is tagged with it too. With BACKPROPAGATE_LOG_JSON each line is a JSON
object whose run_id, trace_id and span_id join it to the run's metrics and trace
(docs/observability.md).
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from backpropagate_api.private_files import create_private_file
from backpropagate_api.redaction import redact
from backpropagate_api.settings import Settings
from backpropagate_api.tracing import tag_run, trace_ids

_current_run_id: contextvars.ContextVar[str] = contextvars.ContextVar("run_id", default="-")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s run_id=%(run_id)s %(message)s"
# The fields of a JSON line, under these names.
JSON_FIELDS = ("asctime", "levelname", "name", "run_id", "trace_id", "span_id", "message")
JSON_NAMES = {"asctime": "time", "levelname": "level", "name": "logger"}


def current_run_id() -> str:
    return _current_run_id.get()


@contextmanager
def run_context(run_id: str) -> Iterator[None]:
    tag_run(run_id)
    token = _current_run_id.set(run_id)
    try:
        yield
    finally:
        _current_run_id.reset(token)


class RunIdFilter(logging.Filter):
    """Adds `run_id`, `trace_id` and `span_id` to each record and redacts secrets from its
    message."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.run_id = current_run_id()
        record.trace_id, record.span_id = trace_ids()
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


class RedactingJsonFormatter(JsonFormatter):
    """A JSON object per line; the message is redacted by RunIdFilter, a traceback here."""

    def __init__(self) -> None:
        super().__init__(
            " ".join(f"%({field})s" for field in JSON_FIELDS),
            rename_fields=JSON_NAMES,
        )

    # logging's own text of a traceback (this formatter's may be a list, which it never asks for)
    def formatException(self, ei: Any) -> str:
        return redact(logging.Formatter.formatException(self, ei))

    def formatStack(self, stack_info: str) -> str:
        return redact(logging.Formatter.formatStack(self, stack_info))


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


class CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at each line: the client's progress bar replaces it
    with a proxy that prints above the bar, which a handler holding the old one would tear."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass  # StreamHandler.__init__ sets it; the property always answers the current one


def configure_logging(
    level: str = "INFO",
    log_file: Path | None = None,
    *,
    json_lines: bool = False,
    mirror_file: Path | None = None,
    mirror_stderr: bool = False,
) -> None:
    """Idempotent: safe to call from every entry point.

    Servers log to stderr; the embedded stack logs to `log_file` (readable by its owner only),
    because the user's terminal belongs to the progress bar and the results. `json_lines`: one
    JSON object per line (BACKPROPAGATE_LOG_JSON), for a log collector. `mirror_file`
    (BACKPROPAGATE_LOG_FILE) gets every line too, appended; `mirror_stderr` (`backprop
    --verbose`) shows the embedded stack's lines on the terminal as well.
    """
    root = logging.getLogger()
    if any(isinstance(f, RunIdFilter) for h in root.handlers for f in h.filters):
        root.setLevel(level)
        return
    handlers: list[logging.Handler] = [
        logging.StreamHandler() if log_file is None else _private_file_handler(log_file)
    ]
    if mirror_file is not None:
        handlers.append(_private_file_handler(mirror_file))
    if mirror_stderr and log_file is not None:
        handlers.append(CurrentStderrHandler())
    for handler in handlers:
        handler.addFilter(RunIdFilter())
        handler.setFormatter(
            RedactingJsonFormatter() if json_lines else RedactingFormatter(LOG_FORMAT)
        )
        root.addHandler(handler)
    root.setLevel(level)


def _private_file_handler(path: Path) -> logging.Handler:
    return logging.FileHandler(create_private_file(path), encoding="utf-8")


def configure_from_settings(
    settings: Settings, log_file: Path | None = None, *, mirror_stderr: bool = False
) -> None:
    """configure_logging as the settings ask: BACKPROPAGATE_LOG_LEVEL, _LOG_JSON, _LOG_FILE."""
    configure_logging(
        settings.log_level,
        log_file,
        json_lines=settings.log_json,
        mirror_file=settings.log_file,
        mirror_stderr=mirror_stderr,
    )
