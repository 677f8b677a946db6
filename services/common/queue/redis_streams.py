"""The job queue and event bus on Redis Streams, for a stack whose services run apart.

Jobs: one stream per queue (`<ns>:jobs:<queue>`) read through one consumer group, so Redis
itself records which consumer holds which job and for how long it has been idle. `claim` first
takes over a job idle past the visibility timeout (XAUTOCLAIM: its worker died), then reads a new
one (XREADGROUP). `touch` resets the idle time, `ack` removes the job. `release` parks the job
under a placeholder consumer, already idle for the whole timeout and with its delivery count one
lower, so the next XAUTOCLAIM takes it and counts it back to what it was.

Events: one stream per channel (`<ns>:events:<channel>`); the stream id is the cursor, so a late
reader replays everything still kept (the newest ~10,000 events per channel) and then blocks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from backpropagate_services.common.errors import QueueUnavailableError
from backpropagate_services.common.queue.base import (
    EVENTS_KEPT_PER_CHANNEL,
    EVENTS_TTL_SECONDS,
    DeadLetter,
    Event,
    Job,
    JobQueue,
    JsonDict,
)

GROUP = "workers"
FIELD = "json"
# Holds released jobs: no worker has this name, so none can touch or ack a job it gave back.
RELEASED = "(released)"
_CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError)

# XCLAIM alone would hand the job to whoever touches it; a worker that stalled past the timeout
# must not take back a job already redelivered to another one. XPENDING filtered by consumer and
# XCLAIM run as one script so no claim can slip between the check and the reset.
_TOUCH_IF_OWNER = """
local held = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1, ARGV[3])
if #held == 1 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
end
return #held
"""

# The same check, then the job moves to the placeholder consumer ARGV[4], idle for ARGV[5] ms
# (the visibility timeout: XAUTOCLAIM takes it next) with one delivery fewer (XAUTOCLAIM adds it
# back), so a graceful stop costs no attempt.
_RELEASE_IF_OWNER = """
local held = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1, ARGV[3])
if #held == 0 then
    return 0
end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[4], 0, ARGV[2],
           'IDLE', ARGV[5], 'RETRYCOUNT', held[1][4] - 1, 'JUSTID')
return 1
"""


# Ack only for the holder (the same check as touch), atomically with the deletion; with a
# second key, the job is first copied to the dead-letter stream (ARGV[4]: the reason).
_ACK_IF_OWNER = """
local held = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1, ARGV[3])
if #held == 0 then
    return 0
end
if KEYS[2] then
    local entry = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
    local payload = '{}'
    if #entry == 1 then
        payload = entry[1][2][2]
    end
    redis.call('XADD', KEYS[2], '*', 'json', payload, 'job_id', ARGV[2],
               'deliveries', held[1][4], 'reason', ARGV[4])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""


@retry(
    retry=retry_if_exception_type(_CONNECTION_ERRORS),
    stop=stop_after_attempt(4),
    wait=wait_exponential(multiplier=0.1, max=1.0),
    reraise=True,
)
def _ping(client: redis.Redis) -> None:
    """Connect, riding out a blip (a restart, a container still starting) but not an outage."""
    client.ping()


def _block_ms(seconds: float) -> int | None:
    """The BLOCK argument for a wait: BLOCK 0 means forever in Redis, so no time left is None."""
    milliseconds = int(seconds * 1000)
    return milliseconds if milliseconds > 0 else None


def _payload(fields: dict[str, str]) -> JsonDict:
    payload: JsonDict = json.loads(fields[FIELD])
    return payload


def _stream_entries(reply: Any) -> list[tuple[str, dict[str, str]]]:
    """The (id, fields) entries of an XREAD / XREADGROUP reply on one stream; [] on timeout."""
    if not reply:
        return []
    [[_, entries]] = reply
    return list(entries)


class RedisStreamsQueue(JobQueue):
    def __init__(
        self,
        redis_url: str,
        *,
        namespace: str,
        visibility_timeout: float,
        events_ttl: float = EVENTS_TTL_SECONDS,
    ) -> None:
        self._namespace = namespace
        self._events_ttl_ms = max(int(events_ttl * 1000), 1)
        self._visibility_timeout = visibility_timeout
        self._min_idle_ms = int(visibility_timeout * 1000)  # idle longer: the worker is gone
        self._client = redis.Redis.from_url(
            redis_url,
            decode_responses=True,
            protocol=2,  # the reply shapes parsed below are RESP2's
            socket_connect_timeout=5.0,
            socket_keepalive=True,
            # One immediate retry reopens a pooled connection the server has closed; the default
            # (ten, with backoff) would hide an outage for seconds behind every call.
            retry=Retry(NoBackoff(), retries=1),
        )
        pool_kwargs = self._client.connection_pool.connection_kwargs
        # Named from the parsed URL, never the URL itself: it may carry a password.
        self._where = pool_kwargs.get("path") or f"{pool_kwargs['host']}:{pool_kwargs['port']}"
        self._touch_if_owner = self._client.register_script(_TOUCH_IF_OWNER)
        self._ack_if_owner = self._client.register_script(_ACK_IF_OWNER)
        self._release_if_owner = self._client.register_script(_RELEASE_IF_OWNER)
        with self._reachable():
            _ping(self._client)

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        try:
            yield
        except _CONNECTION_ERRORS as error:
            raise QueueUnavailableError(
                f"Cannot reach Redis at {self._where}: {error}", where=self._where
            ) from error

    def _jobs_key(self, queue: str) -> str:
        return f"{self._namespace}:jobs:{queue}"

    def _dead_key(self, queue: str) -> str:
        return f"{self._namespace}:dead:{queue}"

    def _events_key(self, channel: str) -> str:
        return f"{self._namespace}:events:{channel}"

    def _ensure_group(self, queue: str) -> str:
        """The queue's stream key, after creating its consumer group if missing.

        Not cached: a Redis restarted without persistence has lost the group, and recreating
        it costs one round trip per claim.
        """
        key = self._jobs_key(queue)
        try:
            # From id 0, so that jobs enqueued before the first claim are delivered too.
            self._client.xgroup_create(key, GROUP, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        return key

    def enqueue(self, queue: str, payload: JsonDict) -> str:
        with self._reachable():
            return str(self._client.xadd(self._jobs_key(queue), {FIELD: json.dumps(payload)}))

    def claim(self, queue: str, consumer: str, timeout: float) -> Job | None:
        deadline = time.monotonic() + timeout
        with self._reachable():
            key = self._ensure_group(queue)
            while True:
                job = self._claim_expired(key, queue, consumer)
                if job is not None:
                    return job
                # Block in slices no longer than the visibility timeout, so a job whose worker
                # dies meanwhile is taken over by the next round instead of after `timeout`.
                wait = min(deadline - time.monotonic(), self._visibility_timeout)
                reply = self._client.xreadgroup(
                    GROUP, consumer, {key: ">"}, count=1, block=_block_ms(wait)
                )
                entries = _stream_entries(reply)
                if entries:
                    [(job_id, fields)] = entries
                    return Job(job_id, queue, _payload(fields))
                if time.monotonic() >= deadline:
                    return None

    def _claim_expired(self, key: str, queue: str, consumer: str) -> Job | None:
        cursor = "0-0"
        while True:
            # XAUTOCLAIM scans the pending list in pages: an empty page with a cursor left means
            # "keep going", only cursor 0-0 means the whole list was seen.
            cursor, claimed, *_ = self._client.xautoclaim(
                key, GROUP, consumer, self._min_idle_ms, start_id=cursor, count=1
            )
            if claimed:
                [(job_id, fields)] = claimed
                [pending] = self._client.xpending_range(key, GROUP, job_id, job_id, 1)
                deliveries = pending["times_delivered"]
                return Job(job_id, queue, _payload(fields), deliveries=deliveries)
            if cursor == "0-0":
                return None

    def touch(self, job: Job, consumer: str) -> bool:
        with self._reachable():
            held = self._touch_if_owner(
                keys=[self._jobs_key(job.queue)], args=[GROUP, job.job_id, consumer]
            )
        return bool(held)

    def release(self, job: Job, consumer: str) -> bool:
        with self._reachable():
            released = self._release_if_owner(
                keys=[self._jobs_key(job.queue)],
                args=[GROUP, job.job_id, consumer, RELEASED, self._min_idle_ms],
            )
        return bool(released)

    def ack(self, job: Job, consumer: str) -> bool:
        # XDEL too: a done job has no reason to stay in memory.
        with self._reachable():
            acked = self._ack_if_owner(
                keys=[self._jobs_key(job.queue)], args=[GROUP, job.job_id, consumer]
            )
        return bool(acked)

    def dead_letter(self, job: Job, consumer: str, reason: str) -> bool:
        with self._reachable():
            acked = self._ack_if_owner(
                keys=[self._jobs_key(job.queue), self._dead_key(job.queue)],
                args=[GROUP, job.job_id, consumer, reason],
            )
        return bool(acked)

    def dead_letters(self, queue: str) -> list[DeadLetter]:
        with self._reachable():
            entries: list[tuple[str, dict[str, str]]] = self._client.xrange(self._dead_key(queue))  # type: ignore[assignment]
        return [
            DeadLetter(
                fields["job_id"], _payload(fields), int(fields["deliveries"]), fields["reason"]
            )
            for _, fields in entries
        ]

    def pending_count(self, queue: str) -> int:
        with self._reachable():
            summary: dict[str, Any] = self._client.xpending(self._ensure_group(queue), GROUP)
        released = sum(
            holder["pending"] for holder in summary["consumers"] if holder["name"] == RELEASED
        )
        return int(summary["pending"]) - released

    def is_pending(self, queue: str, job_id: str) -> bool:
        # ack and dead_letter delete the entry, so it exists exactly while the job is to be done.
        with self._reachable():
            return bool(self._client.xrange(self._jobs_key(queue), job_id, job_id))

    def publish(self, channel: str, data: JsonDict) -> str:
        key = self._events_key(channel)
        with self._reachable():
            pipeline = self._client.pipeline()  # MULTI/EXEC: no event without its expiry
            pipeline.xadd(
                key, {FIELD: json.dumps(data)}, maxlen=EVENTS_KEPT_PER_CHANNEL, approximate=True
            )
            pipeline.pexpire(key, self._events_ttl_ms)  # each event renews the channel's life
            event_id, _ = pipeline.execute()
            return str(event_id)

    def read(self, channel: str, after: str, timeout: float) -> list[Event]:
        with self._reachable():
            reply = self._client.xread(
                {self._events_key(channel): after or "0-0"}, block=_block_ms(timeout)
            )
        return [Event(event_id, _payload(fields)) for event_id, fields in _stream_entries(reply)]

    def close(self) -> None:
        self._client.close()
