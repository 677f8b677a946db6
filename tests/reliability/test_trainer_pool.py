"""A pool of trainer workers on one queue, as Kubernetes runs it (deploy/k8s: the
trainer-worker Deployment that KEDA scales): every job runs exactly once, and the pool shares
the work.

Three `backprop serve trainer` processes take their jobs from one Redis stream and write to one
S3 bucket (moto); the stack's API is served from the test process (`control_plane`), as the
cluster's API-only trainer Service serves it. The runs train a tiny random Llama for a few
steps: what is under test is who takes which job, not what the model learns.
"""

from __future__ import annotations

from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import pytest
import servers
from service_processes import control_plane, serve, stack_env

from backpropagate.render import print_run
from backpropagate.results import RunResult
from backpropagate_api.layout import TRAIN_QUEUE
from backpropagate_api.v1 import common_pb2, trainer_pb2
from backpropagate_services.trainer.runtime.worker import STARTED_MESSAGE

WORKERS = 3
JOBS = 6
STEPS = 3


def consumer_pid(worker: str) -> int:
    """The process id in a worker's name (`train-worker-<host>-<pid>-<thread>`)."""
    return int(worker.rsplit("-", 2)[1])


def test_three_workers_on_one_queue_run_each_of_six_jobs_once_and_share_them(
    redis_url: str,
    s3_endpoint: str,
    model_cache: Path,
    quickstart: Path,
    tiny_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = stack_env(
        redis_url,
        s3_endpoint,
        model_cache,
        tmp_path / "home",
        TRAINER__CPU_DTYPE="float32",  # no speed probe: nothing here measures speed
        TRAINER__THREADS="1",  # three processes on a small machine
    )
    config = trainer_pb2.TrainConfig(
        base_model=str(tiny_model), steps=STEPS, batch_size=2, max_length=64
    )
    with ExitStack() as stack:
        plane = stack.enter_context(control_plane(env))
        workers = [
            stack.enter_context(
                serve(
                    "trainer",
                    servers.free_address(),
                    # Each pod of a pool has a home of its own; the queue and store are shared.
                    {**env, "BACKPROPAGATE_HOME": str(tmp_path / f"worker-{number}")},
                    log_path=tmp_path / f"worker-{number}.log",
                )
            )
            for number in range(WORKERS)
        ]
        run_ids = [plane.submit(quickstart, config) for _ in range(JOBS)]
        records = [plane.wait_for_end(run_id) for run_id in run_ids]
        events = {run_id: plane.events(run_id) for run_id in run_ids}

        assert plane.queue.pending_count(TRAIN_QUEUE) == 0
        assert plane.queue.dead_letters(TRAIN_QUEUE) == []
    for record in records:
        assert record.status == common_pb2.JOB_STATUS_SUCCEEDED, record.error
        assert record.attempts == 1
        assert len(record.loss_history) == STEPS
        run_events = events[record.run_id]
        assert [e.attempt for e in run_events if e.message == STARTED_MESSAGE] == [1]
        steps = [e.step for e in run_events if e.kind == "step" and e.loss > 0]
        assert steps == list(range(1, STEPS + 1)), "each step trained once"
    took = Counter(consumer_pid(record.worker) for record in records)
    assert set(took) == {worker.pid for worker in workers}, took

    print_run(RunResult.from_proto(records[0]))  # `runs show` names the worker
    shown = capsys.readouterr().out.split()
    assert shown[shown.index("worker") + 1] == records[0].worker
