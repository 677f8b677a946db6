"""A blocking SDK call that reports progress through a callback (an export: stage by stage),
as a generator a page can stream to the browser."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

E = TypeVar("E")
R = TypeVar("R")


@dataclass(frozen=True)
class Finished(Generic[R]):
    result: R


def streamed(call: Callable[[Callable[[E], None]], R]) -> Iterator[E | Finished[R]]:
    """Run `call(on_event)` in a thread; yield each event as it comes, then Finished(result),
    or raise the call's error. If the page goes away the call still finishes (an export is
    downloaded whole), with nobody reading its events."""
    updates: queue.Queue[tuple[str, object]] = queue.Queue()

    def run() -> None:
        try:
            updates.put(("done", call(lambda event: updates.put(("event", event)))))
        except BaseException as error:  # handed to the reading thread, raised there
            updates.put(("error", error))

    threading.Thread(target=run, name="ui-call", daemon=True).start()
    while True:
        kind, value = updates.get()
        if kind == "event":
            yield value  # type: ignore[misc]
        elif kind == "done":
            yield Finished(value)  # type: ignore[arg-type]
            return
        else:
            raise value  # type: ignore[misc]
