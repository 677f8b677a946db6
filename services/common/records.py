"""Proto messages as JSON: job records in the store and events on the bus.

Records and events have one schema, the proto's, whether they travel over gRPC, sit in the store
as JSON or pass through Redis, so nothing is described twice.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from backpropagate_api.errors import (
    ArtifactInvalidError,
    DependencyError,
    NotFoundError,
    UserError,
    quoted,
)
from backpropagate_api.redaction import redact
from backpropagate_api.statuses import TERMINAL_STATUSES
from backpropagate_services.common.queue import JobQueue
from backpropagate_services.common.store import ArtifactStore

M = TypeVar("M", bound=Message)
log = logging.getLogger(__name__)


def to_json(message: Message) -> dict[str, object]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def from_json(data: dict[str, object], cls: type[M]) -> M:
    return json_format.ParseDict(data, cls(), ignore_unknown_fields=True)


def save_record(store: ArtifactStore, key: str, record: Message) -> None:
    """Store `record` with every string in it redacted: a credential a caller put in a config
    field (a token in a URL, `api_key=...`) never reaches the store, nor `runs show`."""
    store.put_json(key, _redacted(to_json(record)))


def _redacted(value: object) -> object:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [_redacted(item) for item in value]
    if isinstance(value, dict):
        return {name: _redacted(item) for name, item in value.items()}
    return value


def load_record(store: ArtifactStore, key: str, cls: type[M], what: str) -> M:
    """The record at `key`; NotFoundError if there is none, ArtifactInvalidError if what is
    there is no `what` record (damaged by a full disk, edited by hand)."""
    if not store.exists(key):
        raise NotFoundError(f"No {what} at {key}.", key=key)
    try:
        data = store.get_json(key)
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        return from_json(data, cls)
    except (ValueError, json_format.ParseError) as error:
        raise ArtifactInvalidError(
            f"{key} is not a readable {what} record: {str(error)[:200]}",
            hint=f"Restore {key} from a backup, or delete its directory if the {what} is not "
            "needed any more.",
            key=key,
        ) from error


def publish(queue: JobQueue, channel: str, event: Message) -> None:
    queue.publish(channel, to_json(event))


# A terminal record with no terminal event after this long: that event is not coming.
SETTLE_SECONDS = 5.0


def checked_cursor(queue: JobQueue, after: str) -> str:
    """`after`, a watch's after_event_id, if it is empty or an event id of `queue`; else
    INPUT_INVALID, before the queue is asked (it would fail on it) or the job looked up."""
    if after and not queue.is_event_id(after):
        raise UserError(
            f"after_event_id {quoted(after)} is no event id.",
            hint="Pass the event_id of an event a watch sent, or none to watch from the first.",
            fields="after_event_id",
        )
    return after


def follow(
    queue: JobQueue,
    channel: str,
    cls: type[M],
    is_active: Callable[[], bool],
    is_final: Callable[[M], bool] = lambda _: True,
    *,
    has_ended: Callable[[], bool],
    after: str = "",
    idle_seconds: float,
    poll_seconds: float = 1.0,
    settle_seconds: float = SETTLE_SECONDS,
) -> Iterator[M]:
    """Replay a job's events from the first (or from the one after `after`, a checked_cursor),
    each with its `event_id`, then follow until one has a terminal status and `is_final(event)`
    agrees: a resumed run's history holds the terminal event of an earlier attempt (stopped for
    safety, cancelled), which must not end the watch.

    A watch also ends after `settle_seconds` without an event once `has_ended()` (the job's
    record is terminal): a terminal event that was trimmed away or never published would
    otherwise keep the watch, and a server thread, for as long as the client stays. And it ends
    after `idle_seconds` without any event whatever the job does (one queued behind hours of
    work, one whose worker is gone): a server thread is not held for ever by one watch, and
    the client, which knows the last event it saw, watches again from there."""
    cursor = after
    quiet_since = time.monotonic()
    while is_active():
        events = queue.read(channel, cursor, poll_seconds)
        for event in events:
            cursor = event.event_id
            message = from_json(event.data, cls)
            message.event_id = event.event_id  # type: ignore[attr-defined]
            yield message
            if getattr(message, "status", None) in TERMINAL_STATUSES and is_final(message):
                return
        quiet = time.monotonic() - quiet_since
        if events:
            quiet_since = time.monotonic()
        elif quiet >= idle_seconds or (quiet >= settle_seconds and has_ended()):
            return


class BufferedPublisher:
    """Publishes events, keeping them while the queue is away instead of failing the job.

    A Redis restart must not kill a training run: events that cannot be published are kept (up
    to `limit`, oldest dropped first) and sent, in order, with the next event that gets through.
    """

    def __init__(self, queue: JobQueue, limit: int = 10_000) -> None:
        self.queue = queue
        self.pending: deque[tuple[str, dict[str, object]]] = deque(maxlen=limit)

    def publish(self, channel: str, event: Message) -> None:
        """Publish `event` after the kept ones; keep it too while the queue is away."""
        self.pending.append((channel, to_json(event)))
        try:
            self.flush()
        except DependencyError as exc:
            log.warning("event bus unavailable (%s); %d events kept", exc.code, len(self.pending))

    def flush(self) -> None:
        """Send the kept events, oldest first; DependencyError while the queue is away."""
        while self.pending:
            self.queue.publish(*self.pending[0])
            self.pending.popleft()
