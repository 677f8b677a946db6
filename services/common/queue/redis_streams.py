"""The job queue and event bus on Redis Streams, for a stack whose services run apart.

Jobs: one stream per queue (`<ns>:jobs:<queue>`) read through one consumer group, so Redis
itself records which consumer holds which job and for how long it has been idle. `claim` first
takes over a job idle past the visibility timeout (XAUTOCLAIM: its worker died), then reads a new
one (XREADGROUP). `touch` resets the idle time, `ack` removes the job. `release` parks the job
under a placeholder consumer, already idle for the whole timeout and with its delivery count one
lower, so the next XAUTOCLAIM takes it and counts it back to what it was.

A Redis restarted without persistence has forgotten the streams and their group. Every job call
makes the group again if it is missing, noting when (`<ns>:group-created:<queue>`), so a job
older than its group and gone from the stream is known to have been lost with the old group,
not acked: its worker keeps it and carries on, as after a restart that kept the data (AOF). Only
the queue's copy is gone: were that worker to die too, `backprop runs resume` starts it again.

Events: one stream per channel (`<ns>:events:<channel>`); the stream id is the cursor, so a late
reader replays everything still kept (the newest ~10,000 events per channel) and then blocks.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from backpropagate_api.errors import QueueUnavailableError
from backpropagate_services.common.queue.base import (
    EVENTS_KEPT_PER_CHANNEL,
    EVENTS_TTL_SECONDS,
    DeadLetter,
    Event,
    Job,
    JobQueue,
    JsonDict,
    QueueDepth,
    UnreadablePayload,
    dead_letter_payload,
    log_unreadable,
    parse_payload,
)

GROUP = "workers"
FIELD = "json"
# Holds released jobs: no worker has this name, so none can touch or ack a job it gave back.
RELEASED = "(released)"
_CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError)
# A stream entry's id as XADD makes it: milliseconds and a sequence number, each below 2^64.
_STREAM_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
# A claimed entry: its id, its fields, how many times it was delivered.
_Claimed = tuple[str, dict[str, str], int]

# Lua every job script is built on. The stream is KEYS[1], KEYS[2] when its group was made,
# ARGV[1] the group; for one job, ARGV[2] is its id and ARGV[3] the consumer asking.
#
# ensure_group: make the group if missing (Redis restarted without persistence, the stream
# deleted), from id 0 so that jobs enqueued before it are delivered too, and note when (the
# server's clock in ms, as stream ids count). Every script runs it first: none meets NOGROUP.
#
# holding: how the consumer holds the job. Its pending entry {id, consumer, idle, deliveries};
# {} when the job was lost with an older group (gone from the stream, and older than the group
# in place: an acked or dead-lettered job is gone too, but the group that delivered it is still
# there); nil when another consumer holds it or it has ended.
_FUNCTIONS = """
local function ensure_group()
    local made = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
    if made.err == nil then
        local now = redis.call('TIME')
        redis.call('SET', KEYS[2], now[1] .. string.sub(string.format('%06d', now[2]), 1, 3))
    elseif not string.find(made.err, 'BUSYGROUP') then
        error(made)
    end
end

local function holding()
    ensure_group()
    local held = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1, ARGV[3])
    if #held == 1 then
        return held[1]
    end
    local group_made = tonumber(redis.call('GET', KEYS[2]) or '0')
    if #redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2]) == 0
            and tonumber(string.match(ARGV[2], '^%d+')) < group_made then
        return {}
    end
    return nil
end
"""


def _job_script(body: str) -> str:
    return _FUNCTIONS + body


_MAKE_GROUP = _job_script("ensure_group()")

# The group first (ARGV[2]: the payload): a job is never older than its group, so never taken
# for a lost one.
_ENQUEUE = _job_script("""
ensure_group()
return redis.call('XADD', KEYS[1], '*', 'json', ARGV[2])
""")

# XCLAIM alone would hand the job to whoever touches it; a worker that stalled past the timeout
# must not take back a job already redelivered to another one. XPENDING filtered by consumer and
# XCLAIM run as one script so no claim can slip between the check and the reset.
_TOUCH_IF_OWNER = _job_script("""
local held = holding()
if held == nil then
    return 0
end
if #held > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
end
return 1
""")

# The same check, then the job moves to the placeholder consumer ARGV[4], idle for ARGV[5] ms
# (the visibility timeout: XAUTOCLAIM takes it next) with one delivery fewer (XAUTOCLAIM adds it
# back), so a graceful stop costs no attempt. A lost job goes back as a new entry (payload
# ARGV[6]).
_RELEASE_IF_OWNER = _job_script("""
local held = holding()
if held == nil then
    return 0
end
if #held > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[4], 0, ARGV[2],
               'IDLE', ARGV[5], 'RETRYCOUNT', held[4] - 1, 'JUSTID')
else
    redis.call('XADD', KEYS[1], '*', 'json', ARGV[6])
end
return 1
""")

# Ack only for the holder (the same check as touch), atomically with the deletion; with a
# third key, the job is first written to the dead-letter stream (ARGV[4]: its payload as stored,
# ARGV[5]: its deliveries where the queue has lost count, ARGV[6]: the reason).
_ACK_IF_OWNER = _job_script("""
local held = holding()
if held == nil then
    return 0
end
if KEYS[3] then
    redis.call('XADD', KEYS[3], '*', 'json', ARGV[4], 'job_id', ARGV[2],
               'deliveries', held[4] or ARGV[5], 'reason', ARGV[6])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
""")


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


def _group_gone(error: redis.ResponseError) -> bool:
    """Whether a command failed because the stream or its group vanished under it (Redis
    restarted without persistence, or the key was deleted)."""
    return str(error).startswith(("NOGROUP", "UNBLOCKED"))


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
        self._make_group = self._client.register_script(_MAKE_GROUP)
        self._enqueue = self._client.register_script(_ENQUEUE)
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

    def _group_keys(self, queue: str) -> list[str]:
        """The keys every job script is given: the stream, and when its group was made."""
        return [self._jobs_key(queue), f"{self._namespace}:group-created:{queue}"]

    def _ensure_group(self, queue: str) -> str:
        """The queue's stream key, after creating its consumer group if missing.

        Not cached: a Redis restarted without persistence has lost the group, and recreating
        it costs one round trip per claim.
        """
        self._make_group(keys=self._group_keys(queue), args=[GROUP])
        return self._jobs_key(queue)

    def enqueue(self, queue: str, payload: JsonDict) -> str:
        with self._reachable():
            job_id = self._enqueue(keys=self._group_keys(queue), args=[GROUP, json.dumps(payload)])
        return str(job_id)

    def claim(self, queue: str, consumer: str, timeout: float) -> Job | None:
        deadline = time.monotonic() + timeout
        with self._reachable():
            while True:
                key = self._ensure_group(queue)
                try:
                    claimed = self._claim_expired(key, consumer) or self._read_new(
                        key, consumer, deadline
                    )
                except redis.ResponseError as error:
                    if _group_gone(error):
                        continue  # Redis lost the group since `_ensure_group`: make it again
                    raise
                if claimed is not None:
                    job = self._readable(queue, consumer, *claimed)
                    if job is not None:
                        return job
                elif time.monotonic() >= deadline:
                    return None

    def _claim_expired(self, key: str, consumer: str) -> _Claimed | None:
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
                return job_id, fields, int(pending["times_delivered"])
            if cursor == "0-0":
                return None

    def _read_new(self, key: str, consumer: str, deadline: float) -> _Claimed | None:
        # Block in slices no longer than the visibility timeout, so a job whose worker dies
        # meanwhile is taken over by the next round instead of after `timeout`.
        wait = min(deadline - time.monotonic(), self._visibility_timeout)
        reply = self._client.xreadgroup(GROUP, consumer, {key: ">"}, count=1, block=_block_ms(wait))
        entries = _stream_entries(reply)
        if not entries:
            return None
        [(job_id, fields)] = entries
        return job_id, fields, 1

    def _readable(
        self, queue: str, consumer: str, job_id: str, fields: dict[str, str], deliveries: int
    ) -> Job | None:
        """The claimed entry as a job; None, once dead-lettered, if its payload is unreadable."""
        try:
            return Job(job_id, queue, parse_payload(fields.get(FIELD)), deliveries)
        except UnreadablePayload as unreadable:
            stored = fields.get(FIELD, "")
            self._bury(queue, job_id, consumer, stored, deliveries, str(unreadable))
            log_unreadable(queue, job_id, str(unreadable))
            return None

    def touch(self, job: Job, consumer: str) -> bool:
        with self._reachable():
            held = self._touch_if_owner(
                keys=self._group_keys(job.queue), args=[GROUP, job.job_id, consumer]
            )
        return bool(held)

    def release(self, job: Job, consumer: str) -> bool:
        with self._reachable():
            released = self._release_if_owner(
                keys=self._group_keys(job.queue),
                args=[
                    GROUP,
                    job.job_id,
                    consumer,
                    RELEASED,
                    self._min_idle_ms,
                    json.dumps(job.payload),
                ],
            )
        return bool(released)

    def ack(self, job: Job, consumer: str) -> bool:
        # XDEL too: a done job has no reason to stay in memory.
        with self._reachable():
            acked = self._ack_if_owner(
                keys=self._group_keys(job.queue), args=[GROUP, job.job_id, consumer]
            )
        return bool(acked)

    def dead_letter(self, job: Job, consumer: str, reason: str) -> bool:
        payload = json.dumps(job.payload)
        return self._bury(job.queue, job.job_id, consumer, payload, job.deliveries, reason)

    def _bury(
        self, queue: str, job_id: str, consumer: str, payload: str, deliveries: int, reason: str
    ) -> bool:
        """Move the job to the dead-letter stream if `consumer` holds it; `payload` as stored."""
        with self._reachable():
            acked = self._ack_if_owner(
                keys=[*self._group_keys(queue), self._dead_key(queue)],
                args=[GROUP, job_id, consumer, payload, deliveries, reason],
            )
        return bool(acked)

    def dead_letters(self, queue: str) -> list[DeadLetter]:
        with self._reachable():
            entries: list[tuple[str, dict[str, str]]] = self._client.xrange(self._dead_key(queue))  # type: ignore[assignment]
        return [
            DeadLetter(
                fields["job_id"],
                dead_letter_payload(fields[FIELD]),
                int(fields["deliveries"]),
                fields["reason"],
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

    def depth(self, queue: str) -> QueueDepth:
        # Done jobs are deleted (XDEL): the stream holds exactly the jobs still to be done.
        pending = self.pending_count(queue)
        with self._reachable():
            jobs = int(self._client.xlen(self._jobs_key(queue)))
            dead = int(self._client.xlen(self._dead_key(queue)))
        return QueueDepth(waiting=jobs - pending, pending=pending, dead_letters=dead)

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

    def is_event_id(self, text: str) -> bool:
        match = _STREAM_ID.fullmatch(text)
        return match is not None and all(int(part) < 2**64 for part in match.groups())

    def close(self) -> None:
        self._client.close()
