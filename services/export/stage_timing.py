"""How long each stage of an export takes, as a metric and as spans of the export's trace
(docs/observability.md): a stage lasts from its start to the next stage's start, or to the
export's end."""

from __future__ import annotations

from contextlib import ExitStack
from types import TracebackType

from prometheus_client import Histogram

from backpropagate_api.tracing import span

STAGE_ATTRIBUTE = "backpropagate.export.stage"
STAGE_SECONDS = Histogram(
    "backpropagate_export_stage_seconds",
    "Time an export stage took (merge, convert, quantize, verify, smoke, package, push), by "
    "export format.",
    ["format", "stage"],
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)


class StageTimer:
    """The stages of one export, in order; a context manager that ends the last one."""

    def __init__(self, export_format: str) -> None:
        self.export_format = export_format
        self._current = ExitStack()

    def start(self, stage: str) -> None:
        """`stage` starts now: the one before it ends."""
        self._end()
        timer = STAGE_SECONDS.labels(self.export_format, stage).time()
        self._current.enter_context(timer)
        self._current.enter_context(span(f"export {stage}", **{STAGE_ATTRIBUTE: stage}))

    def _end(self) -> None:
        self._current.close()
        self._current = ExitStack()

    def __enter__(self) -> StageTimer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # The failure that ended the export marks its last stage's span.
        self._current.__exit__(kind, error, traceback)
