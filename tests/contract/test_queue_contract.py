"""What every JobQueue promises, checked against the embedded queue and real Redis alike.

A service is written against this contract, not against an implementation: a test that passes for
one and not the other is a bug in the implementation.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from uuid import uuid4

import pytest
import redis
from servers import LOOPBACK, Restartable, free_port, redis_server, wait_until

from backpropagate_api.errors import QueueUnavailableError
from backpropagate_services.common.queue.base import JobQueue, QueueDepth
from backpropagate_services.common.queue.embedded import EmbeddedQueue
from backpropagate_services.common.queue.redis_streams import RedisStreamsQueue

VISIBILITY_TIMEOUT = 0.5
# Longer than any wait below should take: only a broken implementation reaches it.
GENEROUS = 5.0


Opener = Callable[..., JobQueue]
# Puts a job on a queue behind its back, as a damaged entry, a hand edit or another version's
# writer would: (queue, payload as stored; None: no payload field at all).
RawWriter = Callable[[str, str | None], None]


@contextmanager
def fresh_queue(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, namespace: str = ""
) -> Iterator[Opener]:
    """Opens handles on one fresh, empty queue, as separate processes would, and closes them
    after the test; Redis ones get their own namespace so tests cannot see each other."""
    namespace = namespace or f"test-{uuid4().hex}"
    opened: list[JobQueue] = []

    def open_handle(**options: float) -> JobQueue:
        """`options`: the implementations' own (events_ttl)."""
        handle: JobQueue
        if kind == "redis":
            handle = RedisStreamsQueue(
                request.getfixturevalue("redis_url"),
                namespace=namespace,
                visibility_timeout=VISIBILITY_TIMEOUT,
                **options,
            )
        else:
            in_memory = kind == "embedded-in-memory"
            path = None if in_memory else tmp_path / "queue.sqlite3"
            handle = EmbeddedQueue(visibility_timeout=VISIBILITY_TIMEOUT, path=path, **options)
        opened.append(handle)
        return handle

    yield open_handle
    for handle in opened:
        handle.close()


@pytest.fixture(params=["embedded", "embedded-in-memory", "redis"])
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobQueue]:
    with fresh_queue(request.param, request, tmp_path) as open_handle:
        yield open_handle()


@pytest.fixture(params=["embedded", "redis"])
def open_queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """For queues that outlive their handles: an in-memory one is private to its object."""
    with fresh_queue(request.param, request, tmp_path) as open_handle:
        yield open_handle


@pytest.fixture(params=["embedded", "redis"])
def queue_written_behind(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[JobQueue, RawWriter]]:
    """A queue, and a writer that bypasses it (the embedded file, or the Redis stream)."""
    namespace = f"test-{uuid4().hex}"
    with fresh_queue(request.param, request, tmp_path, namespace) as open_handle:
        handle = open_handle()
        if request.param == "redis":
            client = redis.Redis.from_url(request.getfixturevalue("redis_url"))

            def write(queue: str, payload: str | None) -> None:
                fields = {"note": "no payload"} if payload is None else {"json": payload}
                client.xadd(f"{namespace}:jobs:{queue}", fields)  # type: ignore[arg-type]

            yield handle, write
            client.close()
        else:
            database = sqlite3.connect(tmp_path / "queue.sqlite3", isolation_level=None)

            def write(queue: str, payload: str | None) -> None:
                # The column cannot be NULL: an empty payload is the nearest there is.
                database.execute(
                    "INSERT INTO jobs (queue, payload) VALUES (?, ?)", (queue, payload or "")
                )

            yield handle, write
            database.close()


def after_a_moment(action: Callable[[], object]) -> threading.Thread:
    """Run `action` from another thread shortly after the caller starts waiting."""

    def act() -> None:
        time.sleep(0.2)
        action()

    thread = threading.Thread(target=act)
    thread.start()
    return thread


# -- jobs ---------------------------------------------------------------------------------------


def test_enqueued_job_is_claimed_once_with_its_payload(queue: JobQueue) -> None:
    payload = {"run_id": "run-1", "config": {"epochs": 2, "lr": 0.0002}}
    job_id = queue.enqueue("train", payload)

    job = queue.claim("train", "worker-1", timeout=GENEROUS)

    assert job is not None
    assert (job.job_id, job.queue, job.payload, job.deliveries) == (job_id, "train", payload, 1)


def test_jobs_are_claimed_in_the_order_they_were_enqueued(queue: JobQueue) -> None:
    for number in range(3):
        queue.enqueue("train", {"n": number})

    claimed = [queue.claim("train", "worker-1", timeout=GENEROUS) for _ in range(3)]

    assert [job.payload["n"] for job in claimed if job] == [0, 1, 2]


def test_queues_do_not_share_jobs(queue: JobQueue) -> None:
    queue.enqueue("train", {"run_id": "run-1"})

    assert queue.claim("export", "worker-1", timeout=0.1) is None


def test_claimed_job_is_not_given_to_a_second_consumer(queue: JobQueue) -> None:
    queue.enqueue("train", {"run_id": "run-1"})
    assert queue.claim("train", "worker-1", timeout=GENEROUS) is not None

    assert queue.claim("train", "worker-2", timeout=0.2) is None


def test_job_of_dead_worker_is_redelivered_after_visibility_timeout(queue: JobQueue) -> None:
    job_id = queue.enqueue("train", {"run_id": "run-1"})
    first = queue.claim("train", "worker-1", timeout=GENEROUS)
    assert first is not None
    started = time.monotonic()

    # worker-1 dies: no touch, no ack. worker-2 is already waiting when the job expires.
    second = queue.claim("train", "worker-2", timeout=GENEROUS)

    assert second is not None
    assert time.monotonic() - started >= VISIBILITY_TIMEOUT * 0.9
    assert (second.job_id, second.payload, second.deliveries) == (job_id, first.payload, 2)


def test_touched_job_is_not_redelivered(queue: JobQueue) -> None:
    queue.enqueue("train", {"run_id": "run-1"})
    job = queue.claim("train", "worker-1", timeout=GENEROUS)
    assert job is not None

    for _ in range(4):  # 0.8 s in all, well past the visibility timeout
        assert queue.claim("train", "worker-2", timeout=0.2) is None
        assert queue.touch(job, "worker-1")


def test_touch_by_a_worker_that_lost_its_job_does_not_keep_it_alive(queue: JobQueue) -> None:
    queue.enqueue("train", {"run_id": "run-1"})
    stalled = queue.claim("train", "worker-1", timeout=GENEROUS)
    assert stalled is not None
    assert queue.claim("train", "worker-2", timeout=GENEROUS) is not None  # redelivered

    # worker-2 dies in turn; worker-1 wakes up and keeps touching a job it no longer holds.
    third = None
    for _ in range(5):
        queue.touch(stalled, "worker-1")
        third = queue.claim("train", "worker-3", timeout=0.2)
        if third is not None:
            break

    assert third is not None
    assert third.deliveries == 3


def test_touch_tells_a_worker_whether_it_still_holds_its_job(queue: JobQueue) -> None:
    queue.enqueue("train", {"run_id": "run-1"})
    stalled = queue.claim("train", "worker-1", timeout=GENEROUS)
    assert stalled is not None
    holder = queue.claim("train", "worker-2", timeout=GENEROUS)  # redelivered after the timeout
    assert holder is not None

    assert not queue.touch(stalled, "worker-1")
    assert queue.touch(holder, "worker-2")
    assert queue.ack(holder, "worker-2")
    assert not queue.touch(holder, "worker-2")


def test_acked_job_is_never_redelivered(queue: JobQueue) -> None:
    queue.enqueue("train", {"run_id": "run-1"})
    job = queue.claim("train", "worker-1", timeout=GENEROUS)
    assert job is not None

    assert queue.ack(job, "worker-1")

    assert queue.claim("train", "worker-2", timeout=VISIBILITY_TIMEOUT * 2) is None


def test_ack_by_a_worker_that_lost_its_job_does_not_take_it_from_its_new_holder(
    queue: JobQueue,
) -> None:
    queue.enqueue("train", {"run_id": "run-1"})
    stalled = queue.claim("train", "worker-1", timeout=GENEROUS)
    assert stalled is not None
    holder = queue.claim("train", "worker-2", timeout=GENEROUS)  # redelivered after the timeout
    assert holder is not None

    assert not queue.ack(stalled, "worker-1")

    assert queue.pending_count("train") == 1
    assert queue.ack(holder, "worker-2")
    assert queue.pending_count("train") == 0


def test_a_dead_lettered_job_is_kept_for_an_operator_and_never_delivered_again(
    queue: JobQueue,
) -> None:
    queue.enqueue("train", {"run_id": "run-1"})
    first = queue.claim("train", "worker-1", timeout=GENEROUS)
    assert first is not None
    again = queue.claim("train", "worker-2", timeout=GENEROUS)  # worker-1 died
    assert again is not None and again.deliveries == 2

    assert not queue.dead_letter(first, "worker-1", "not yours")
    assert queue.dead_letter(again, "worker-2", "killed its worker twice")

    assert queue.claim("train", "worker-3", timeout=VISIBILITY_TIMEOUT * 2) is None
    [letter] = queue.dead_letters("train")
    assert (letter.job_id, letter.payload, letter.deliveries, letter.reason) == (
        again.job_id,
        {"run_id": "run-1"},
        2,
        "killed its worker twice",
    )
    assert queue.dead_letters("export") == []


@pytest.mark.parametrize(
    ("stored", "why"),
    [
        ("{'run_id': 'run-1'", "the payload is not JSON"),
        ('["run-1"]', "the payload is not a JSON object"),
        (None, "unreadable:"),
    ],
)
def test_a_job_whose_payload_cannot_be_read_is_dead_lettered_and_the_next_one_claimed(
    queue_written_behind: tuple[JobQueue, RawWriter], stored: str | None, why: str
) -> None:
    queue, write_behind = queue_written_behind
    write_behind("train", stored)
    valid_id = queue.enqueue("train", {"run_id": "run-2"})

    job = queue.claim("train", "worker-1", timeout=GENEROUS)
    assert job is not None and (job.job_id, job.payload) == (valid_id, {"run_id": "run-2"})
    queue.ack(job, "worker-1")

    # Past the visibility timeout: an unreadable job left claimed would be offered again.
    assert queue.claim("train", "worker-2", timeout=VISIBILITY_TIMEOUT * 2) is None
    [letter] = queue.dead_letters("train")
    assert (letter.payload, letter.deliveries) == ({}, 1)
    assert why in letter.reason
    assert not queue.is_pending("train", letter.job_id)


def test_claim_with_nothing_to_do_returns_none_after_its_timeout(queue: JobQueue) -> None:
    started = time.monotonic()

    assert queue.claim("train", "worker-1", timeout=0.3) is None

    assert 0.25 <= time.monotonic() - started < GENEROUS


def test_waiting_claim_wakes_when_a_job_is_enqueued(queue: JobQueue) -> None:
    thread = after_a_moment(lambda: queue.enqueue("train", {"run_id": "run-1"}))
    started = time.monotonic()

    job = queue.claim("train", "worker-1", timeout=GENEROUS)

    thread.join()
    assert job is not None and job.payload == {"run_id": "run-1"}
    assert time.monotonic() - started < GENEROUS / 2


def test_pending_count_counts_claimed_jobs_until_they_are_acked(queue: JobQueue) -> None:
    for number in range(3):
        queue.enqueue("train", {"n": number})
    assert queue.pending_count("train") == 0

    first = queue.claim("train", "worker-1", timeout=GENEROUS)
    assert queue.claim("train", "worker-2", timeout=GENEROUS) is not None
    assert queue.pending_count("train") == 2

    assert first is not None
    queue.ack(first, "worker-1")
    assert queue.pending_count("train") == 1


def test_depth_counts_waiting_held_and_dead_lettered_jobs_and_a_released_job_waits_again(
    queue: JobQueue,
) -> None:
    for number in range(4):
        queue.enqueue("train", {"n": number})
    queue.enqueue("export", {"n": 9})
    assert queue.depth("train") == QueueDepth(waiting=4, pending=0, dead_letters=0)

    done, released, buried = (queue.claim("train", "worker-1", timeout=GENEROUS) for _ in range(3))
    assert done is not None and released is not None and buried is not None
    assert queue.depth("train") == QueueDepth(waiting=1, pending=3, dead_letters=0)

    queue.ack(done, "worker-1")
    queue.release(released, "worker-1")
    queue.dead_letter(buried, "worker-1", "kills its workers")

    assert queue.depth("train") == QueueDepth(waiting=2, pending=0, dead_letters=1)
    assert queue.depth("export") == QueueDepth(waiting=1, pending=0, dead_letters=0)


def test_a_job_is_pending_from_enqueue_until_it_is_acked_or_dead_lettered(
    queue: JobQueue,
) -> None:
    done_id = queue.enqueue("train", {"n": 0})
    failing_id = queue.enqueue("train", {"n": 1})
    assert queue.is_pending("train", done_id) and queue.is_pending("train", failing_id)
    assert not queue.is_pending("export", done_id)

    done = queue.claim("train", "worker-1", timeout=GENEROUS)
    failing = queue.claim("train", "worker-1", timeout=GENEROUS)
    assert done is not None and failing is not None
    assert queue.is_pending("train", done_id)  # held is still to be done
    queue.ack(done, "worker-1")
    queue.dead_letter(failing, "worker-1", "kills its workers")

    assert not queue.is_pending("train", done_id)
    assert not queue.is_pending("train", failing_id)


# -- release ------------------------------------------------------------------------------------


def test_a_released_job_goes_to_the_next_claim_at_once_ahead_of_newer_jobs(
    queue: JobQueue,
) -> None:
    queue.enqueue("train", {"n": 0})
    queue.enqueue("train", {"n": 1})
    job = queue.claim("train", "worker-1", timeout=GENEROUS)
    assert job is not None
    started = time.monotonic()

    assert queue.release(job, "worker-1")
    again = queue.claim("train", "worker-2", timeout=GENEROUS)

    assert time.monotonic() - started < VISIBILITY_TIMEOUT / 2
    assert again is not None
    assert (again.job_id, again.payload, again.deliveries) == (job.job_id, {"n": 0}, 1)
    assert queue.is_pending("train", job.job_id)


def test_a_release_is_not_counted_as_a_failed_delivery(queue: JobQueue) -> None:
    queue.enqueue("train", {"run_id": "run-1"})
    assert queue.claim("train", "worker-1", timeout=GENEROUS) is not None  # worker-1 dies
    stopping = queue.claim("train", "worker-2", timeout=GENEROUS)
    assert stopping is not None and stopping.deliveries == 2

    assert queue.release(stopping, "worker-2")  # asked to shut down, its progress saved
    resumed = queue.claim("train", "worker-3", timeout=GENEROUS)
    assert resumed is not None and resumed.deliveries == 2
    # worker-3 dies in turn: that crash counts.
    after_crash = queue.claim("train", "worker-4", timeout=GENEROUS)
    assert after_crash is not None and after_crash.deliveries == 3


def test_release_by_a_worker_that_does_not_hold_the_job_changes_nothing(queue: JobQueue) -> None:
    queue.enqueue("train", {"run_id": "run-1"})
    job = queue.claim("train", "worker-1", timeout=GENEROUS)
    assert job is not None

    assert not queue.release(job, "worker-2")

    assert queue.claim("train", "worker-2", timeout=0.2) is None
    assert queue.pending_count("train") == 1
    assert queue.touch(job, "worker-1")


def test_a_worker_that_released_its_job_holds_it_no_more(queue: JobQueue) -> None:
    queue.enqueue("train", {"run_id": "run-1"})
    job = queue.claim("train", "worker-1", timeout=GENEROUS)
    assert job is not None

    assert queue.release(job, "worker-1")

    assert not queue.touch(job, "worker-1")
    assert not queue.ack(job, "worker-1")
    assert not queue.release(job, "worker-1")
    assert queue.pending_count("train") == 0  # waiting again, not claimed
    assert queue.is_pending("train", job.job_id)


# -- events -------------------------------------------------------------------------------------


def test_events_replay_from_the_start_for_an_empty_cursor(queue: JobQueue) -> None:
    published = [queue.publish("run-1", {"step": step}) for step in range(3)]

    events = queue.read("run-1", "", timeout=0)

    assert [event.event_id for event in events] == published
    assert [event.data for event in events] == [{"step": 0}, {"step": 1}, {"step": 2}]
    assert published == sorted(published)


def test_read_after_a_cursor_returns_only_newer_events(queue: JobQueue) -> None:
    queue.publish("run-1", {"step": 0})
    [seen] = queue.read("run-1", "", timeout=0)
    queue.publish("run-1", {"step": 1})

    newer = queue.read("run-1", seen.event_id, timeout=0)

    assert [event.data for event in newer] == [{"step": 1}]
    assert queue.read("run-1", newer[-1].event_id, timeout=0) == []


def test_channels_do_not_share_events(queue: JobQueue) -> None:
    queue.publish("run-1", {"step": 0})

    assert queue.read("run-2", "", timeout=0) == []


def test_blocking_read_wakes_when_an_event_is_published_from_another_thread(
    queue: JobQueue,
) -> None:
    thread = after_a_moment(lambda: queue.publish("run-1", {"state": "RUNNING"}))
    started = time.monotonic()

    events = queue.read("run-1", "", timeout=GENEROUS)

    thread.join()
    assert [event.data for event in events] == [{"state": "RUNNING"}]
    assert time.monotonic() - started < GENEROUS / 2


def test_read_with_no_new_events_returns_empty_after_its_timeout(queue: JobQueue) -> None:
    started = time.monotonic()

    assert queue.read("run-1", "", timeout=0.3) == []

    assert 0.25 <= time.monotonic() - started < GENEROUS


def test_the_ids_of_published_events_are_event_ids(queue: JobQueue) -> None:
    published = [queue.publish("run-1", {"step": step}) for step in range(3)]

    assert all(queue.is_event_id(event_id) for event_id in published)


@pytest.mark.parametrize(
    "cursor",
    ["evil", "1-2-3", "-1", "1_000", " 1", "1.5", "$", "+", "99999999999999999999999", "9" * 5000],
)
def test_a_cursor_no_queue_could_have_made_is_no_event_id(queue: JobQueue, cursor: str) -> None:
    assert not queue.is_event_id(cursor)


# -- handles on one queue (processes) ----------------------------------------------------------


def test_handles_on_one_queue_share_its_jobs_and_events(open_queue: Opener) -> None:
    first, second = open_queue(), open_queue()
    job_id = first.enqueue("train", {"run_id": "run-1"})

    job = second.claim("train", "worker-2", timeout=GENEROUS)
    event_id = second.publish("run-1", {"state": "RUNNING"})

    assert job is not None and job.job_id == job_id
    assert first.claim("train", "worker-1", timeout=0.2) is None
    assert first.pending_count("train") == 1
    assert [event.event_id for event in first.read("run-1", "", timeout=0)] == [event_id]
    assert first.ack(job, "worker-2")  # a holder is its consumer name, whichever handle
    assert not second.is_pending("train", job_id)


def test_waiting_claim_and_read_wake_for_writes_through_another_handle(
    open_queue: Opener,
) -> None:
    writer, waiter = open_queue(), open_queue()
    started = time.monotonic()

    thread = after_a_moment(lambda: writer.enqueue("train", {"run_id": "run-1"}))
    job = waiter.claim("train", "worker-1", timeout=GENEROUS)
    thread.join()
    thread = after_a_moment(lambda: writer.publish("run-1", {"state": "RUNNING"}))
    events = waiter.read("run-1", "", timeout=GENEROUS)
    thread.join()

    assert job is not None and job.payload == {"run_id": "run-1"}
    assert [event.data for event in events] == [{"state": "RUNNING"}]
    assert time.monotonic() - started < GENEROUS / 2


def test_jobs_claims_events_and_dead_letters_outlive_the_handle_that_wrote_them(
    open_queue: Opener,
) -> None:
    writer = open_queue()
    ids = [writer.enqueue("train", {"n": number}) for number in range(3)]
    failing = writer.claim("train", "worker-1", timeout=GENEROUS)
    held = writer.claim("train", "worker-1", timeout=GENEROUS)
    assert failing is not None and held is not None
    writer.dead_letter(failing, "worker-1", "kills its workers")
    event_id = writer.publish("run-1", {"step": 1})
    writer.close()

    reader = open_queue()

    assert [letter.job_id for letter in reader.dead_letters("train")] == [ids[0]]
    assert [event.event_id for event in reader.read("run-1", "", timeout=0)] == [event_id]
    assert reader.pending_count("train") == 1
    assert reader.touch(held, "worker-1")  # the claim survived: still held, not redelivered
    waiting = reader.claim("train", "worker-2", timeout=GENEROUS)
    assert waiting is not None and waiting.job_id == ids[2]


# -- Redis down ---------------------------------------------------------------------------------


def test_unreachable_redis_raises_queue_unavailable_naming_the_address() -> None:
    port = free_port()  # nothing listens there

    with pytest.raises(QueueUnavailableError, match=f"{LOOPBACK}:{port}"):
        RedisStreamsQueue(f"redis://{LOOPBACK}:{port}/0", namespace="bp", visibility_timeout=1)


def test_a_channel_without_new_events_for_its_ttl_goes_whole(open_queue: Opener) -> None:
    queue = open_queue(events_ttl=1.0)
    queue.publish("run-quiet", {"step": 1})
    queue.publish("run-busy", {"step": 1})
    for step in (2, 3, 4):  # the busy channel's events keep it alive
        time.sleep(0.5)
        queue.publish("run-busy", {"step": step})
    # Redis expires on its own clock; the embedded queue when an event is published.
    wait_until(lambda: not queue.read("run-quiet", "", 0), what="expiry", timeout=5)
    assert [event.data["step"] for event in queue.read("run-busy", "", 0)] == [1, 2, 3, 4]
    assert queue.read("run-quiet", "", 0) == []
    queue.publish("run-quiet", {"step": 9})  # a channel that comes back starts afresh
    assert [event.data["step"] for event in queue.read("run-quiet", "", 0)] == [9]


@pytest.mark.parametrize("first_call", ["the holder's", "another worker's claim"])
def test_a_job_held_when_redis_restarts_without_persistence_stays_with_its_worker(
    first_call: str,
) -> None:
    port = free_port()
    with Restartable(lambda: redis_server(port)) as server:  # no AOF: a restart forgets all
        queue = RedisStreamsQueue(server.address, namespace="bp", visibility_timeout=60)
        queue.enqueue("train", {"run_id": "run-1"})
        job = queue.claim("train", "holder", timeout=GENEROUS)
        assert job is not None
        server.stop()
        server.start()
        if first_call == "another worker's claim":  # makes the queue's group again first
            assert queue.claim("train", "idle-worker", timeout=0.1) is None

        still_held = queue.touch(job, "holder")
        taken = queue.claim("train", "idle-worker", timeout=0.1)
        acked = queue.ack(job, "holder")
        next_id = queue.enqueue("train", {"run_id": "run-2"})
        following = queue.claim("train", "holder", timeout=GENEROUS)
        queue.close()

    assert still_held, "the worker would stop a job nobody else can take"
    assert taken is None
    assert acked
    assert following is not None and following.job_id == next_id
