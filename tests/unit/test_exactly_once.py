"""A job is acknowledged only once its outcome is recorded; ended jobs never run again; a job
that keeps killing its workers is failed and dead-lettered instead of looping forever.

The real export worker runs against the embedded queue and a local store (the contract tests
prove the Redis queue and S3 store behave the same).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from backpropagate_api.layout import EXPORT_QUEUE, export_record_key
from backpropagate_api.settings import QueueSettings, Settings, StoreSettings
from backpropagate_api.v1 import common_pb2, export_pb2
from backpropagate_services.common.records import load_record, save_record
from backpropagate_services.common.runtime import Runtime
from backpropagate_services.export.worker import ExportWorker

VISIBILITY_TIMEOUT = 0.3


@pytest.fixture
def runtime(tmp_path: Path) -> Runtime:
    settings = Settings(
        home=tmp_path,
        queue=QueueSettings(visibility_timeout_seconds=VISIBILITY_TIMEOUT, max_attempts=2),
        store=StoreSettings(local_root=tmp_path / "store"),
    )
    return Runtime.from_settings(settings)


def save_export(runtime: Runtime, status: int) -> export_pb2.ExportResult:
    result = export_pb2.ExportResult(export_id="export-1", run_id="run-1", status=status)
    save_record(runtime.store, export_record_key(result.export_id), result)
    runtime.queue.enqueue(EXPORT_QUEUE, {"export_id": result.export_id})
    return result


def stored(runtime: Runtime) -> export_pb2.ExportResult:
    return load_record(
        runtime.store, export_record_key("export-1"), export_pb2.ExportResult, "export"
    )


def test_a_redelivered_job_whose_export_already_ended_is_acked_without_running(runtime):
    before = save_export(runtime, common_pb2.JOB_STATUS_SUCCEEDED)

    ExportWorker(runtime).run_once()

    assert stored(runtime) == before
    assert runtime.queue.pending_count(EXPORT_QUEUE) == 0
    assert runtime.queue.claim(EXPORT_QUEUE, "anyone", VISIBILITY_TIMEOUT * 2) is None


def test_a_record_the_store_cannot_give_is_not_acked_but_delivered_again(runtime):
    runtime.queue.enqueue(EXPORT_QUEUE, {"export_id": "export-1"})  # no record saved (yet)

    with pytest.raises(Exception, match="export-1"):
        ExportWorker(runtime).run_once()

    again = runtime.queue.claim(EXPORT_QUEUE, "another-worker", VISIBILITY_TIMEOUT * 4)
    assert again is not None and again.deliveries == 2


def test_a_job_delivered_more_than_max_attempts_is_failed_and_dead_lettered(runtime):
    save_export(runtime, common_pb2.JOB_STATUS_RUNNING)
    for dead_worker in ("worker-a", "worker-b"):  # each took the job and died without an ack
        assert runtime.queue.claim(EXPORT_QUEUE, dead_worker, VISIBILITY_TIMEOUT * 4)

    ExportWorker(runtime).run_once()  # the third delivery: over max_attempts=2

    record = stored(runtime)
    assert record.status == common_pb2.JOB_STATUS_FAILED
    assert record.error.code == "RUNTIME_JOB_ATTEMPTS_EXHAUSTED"
    [letter] = runtime.queue.dead_letters(EXPORT_QUEUE)
    assert letter.payload == {"export_id": "export-1"} and letter.deliveries == 3
    assert runtime.queue.claim(EXPORT_QUEUE, "anyone", VISIBILITY_TIMEOUT * 2) is None


def test_a_job_without_a_record_still_leaves_the_queue_after_max_attempts(runtime):
    runtime.queue.enqueue(EXPORT_QUEUE, {"export_id": "export-1"})  # its record never written
    for dead_worker in ("worker-a", "worker-b"):
        assert runtime.queue.claim(EXPORT_QUEUE, dead_worker, VISIBILITY_TIMEOUT * 4)

    with pytest.raises(Exception, match="export-1"):
        ExportWorker(runtime).run_once()

    assert [letter.deliveries for letter in runtime.queue.dead_letters(EXPORT_QUEUE)] == [3]
    assert runtime.queue.pending_count(EXPORT_QUEUE) == 0
