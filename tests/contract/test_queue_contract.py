"""What every JobQueue promises, checked against the embedded queue and real Redis alike.

A service is written against this contract, not against an implementation: a test that passes for
one and not the other is a bug in the implementation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from uuid import uuid4

import pytest
from servers import LOOPBACK, free_port

from backpropagate_services.common.errors import QueueUnavailableError
from backpropagate_services.common.queue.base import JobQueue
from backpropagate_services.common.queue.embedded import EmbeddedQueue
from backpropagate_services.common.queue.redis_streams import RedisStreamsQueue

VISIBILITY_TIMEOUT = 0.5
# Longer than any wait below should take: only a broken implementation reaches it.
GENEROUS = 5.0


@pytest.fixture(params=["embedded", "redis"])
def queue(request: pytest.FixtureRequest) -> Iterator[JobQueue]:
    """A fresh, empty queue; Redis ones get their own namespace so tests cannot see each other."""
    implementation: JobQueue
    if request.param == "redis":
        implementation = RedisStreamsQueue(
            request.getfixturevalue("redis_url"),
            namespace=f"test-{uuid4().hex}",
            visibility_timeout=VISIBILITY_TIMEOUT,
        )
    else:
        implementation = EmbeddedQueue(visibility_timeout=VISIBILITY_TIMEOUT)
    yield implementation
    implementation.close()


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
        queue.touch(job, "worker-1")


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


# -- Redis down ---------------------------------------------------------------------------------


def test_unreachable_redis_raises_queue_unavailable_naming_the_address() -> None:
    port = free_port()  # nothing listens there

    with pytest.raises(QueueUnavailableError, match=f"{LOOPBACK}:{port}"):
        RedisStreamsQueue(f"redis://{LOOPBACK}:{port}/0", namespace="bp", visibility_timeout=1)
