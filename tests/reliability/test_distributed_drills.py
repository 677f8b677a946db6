"""Runs trained by several processes under torch's elastic launcher, on this CPU with gloo: a
pool worker's run whose rank 1 is killed, and one job across two "nodes" as the indexed Job of
deploy/k8s/multinode runs it, on loopback.

The workers take their jobs from a real Redis and write to S3 (moto); the stack's API is served
from the test process (`control_plane`). The runs train a tiny random Llama: what is under test
is who trains, records and recovers what, not what the model learns.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from contextlib import suppress
from pathlib import Path

import psutil
import servers
from service_processes import control_plane, serve, stack_env

from backpropagate_api.layout import TRAIN_QUEUE
from backpropagate_api.v1 import common_pb2, trainer_pb2
from backpropagate_services.trainer.runtime.launcher import RANK_MODULE
from backpropagate_services.trainer.runtime.worker import STARTED_MESSAGE

STEPS = 8
# From rank 1's death to its worker leaving the job to be delivered again: torchrun looks at
# its processes every second and stops the others; rank 0, holding, notices at its next poll.
ATTEMPT_FAILS_WITHIN_SECONDS = 30.0


def train_config(tiny_model: Path, **fields: object) -> trainer_pb2.TrainConfig:
    return trainer_pb2.TrainConfig(
        base_model=str(tiny_model), steps=STEPS, batch_size=4, max_length=64, **fields
    )


def rank_process(worker: subprocess.Popen[bytes], rank: int) -> psutil.Process:
    """The process of `rank` among those the worker started (torchrun's children)."""
    for child in psutil.Process(worker.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and RANK_MODULE in child.cmdline():
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no rank {rank} under worker {worker.pid}")


def step_losses(events: list[trainer_pb2.RunEvent], attempt: int) -> dict[int, float]:
    return {e.step: e.loss for e in events if e.kind == "step" and e.attempt == attempt}


def test_a_killed_rank_fails_the_attempt_and_the_job_resumes_from_its_checkpoint(
    redis_url: str,
    s3_endpoint: str,
    model_cache: Path,
    quickstart: Path,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    """kill -9 of rank 1 while rank 0 holds after the checkpoint of step 4: torchrun stops rank
    0, the worker leaves the job without an outcome, the job comes back after the visibility
    timeout, and the second attempt goes on from step 4 to the end."""
    release = tmp_path / "release"
    env = stack_env(
        redis_url,
        s3_endpoint,
        model_cache,
        tmp_path / "home",
        TRAINER__CPU_DTYPE="float32",
        QUEUE__VISIBILITY_TIMEOUT_SECONDS="6",
        FAULT__HOLD_AT_STEP="5",
        FAULT__HOLD_RELEASE_FILE=str(release),
    )
    log = tmp_path / "worker.log"
    config = train_config(tiny_model, checkpoint_every=2, nproc_per_node=2)
    with (
        control_plane(env) as plane,
        serve("trainer", servers.free_address(), env, log_path=log) as worker,
    ):
        run_id = plane.submit(quickstart, config)
        plane.wait_for_event(
            run_id, lambda e: e.kind == "checkpoint" and e.step == 4, "checkpoint 4", process=worker
        )
        killed = rank_process(worker, 1)
        killed.kill()  # SIGKILL: no handler, no goodbye
        killed_at = time.monotonic()
        servers.wait_until(
            lambda: "left to be delivered again" in log.read_text(errors="replace"),
            what="the worker giving the attempt up",
            timeout=ATTEMPT_FAILS_WITHIN_SECONDS,
            process=worker,
        )
        failed_after = time.monotonic() - killed_at
        plane.wait_for_event(
            run_id,
            lambda e: e.message == STARTED_MESSAGE and e.attempt == 2,
            "the second attempt",
            process=worker,
        )
        release.touch()  # the second attempt holds before step 5 too
        record = plane.wait_for_end(run_id, process=worker)
        events = plane.events(run_id)
        servers.wait_until(  # acked once its processes have exited
            lambda: plane.queue.pending_count(TRAIN_QUEUE) == 0, what="the ack", timeout=30
        )
        assert plane.queue.dead_letters(TRAIN_QUEUE) == []

    assert record.status == common_pb2.JOB_STATUS_SUCCEEDED, record.error
    assert (record.attempts, record.resumed_from_step, record.world_size) == (2, 4, 2)
    first, second = step_losses(events, 1), step_losses(events, 2)
    assert sorted(first) == [1, 2, 3, 4] and sorted(second) == [5, 6, 7, 8]
    assert record.loss_history == [first[s] for s in range(1, 5)] + [
        second[s] for s in range(5, STEPS + 1)
    ]
    text = log.read_text(errors="replace")
    assert "rank: 1" in text and "SIGKILL" in text  # torchrun's summary names the dead rank
    print(f"rank 1 killed: the attempt was given up {failed_after:.1f} s later")


def test_a_worker_stopped_mid_run_checkpoints_and_releases_it_for_the_next_worker(
    redis_url: str,
    s3_endpoint: str,
    model_cache: Path,
    quickstart: Path,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    """SIGTERM to a pool worker whose run trains in two processes, rank 0 holding before step
    3: rank 0 checkpoints step 2 and releases the job, both processes end, and another worker
    goes on from step 2 at once (a release is no failed attempt: no visibility timeout)."""
    release = tmp_path / "release"
    env = stack_env(
        redis_url,
        s3_endpoint,
        model_cache,
        tmp_path / "home",
        TRAINER__CPU_DTYPE="float32",
        FAULT__HOLD_AT_STEP="3",
        FAULT__HOLD_RELEASE_FILE=str(release),
    )
    with control_plane(env) as plane:
        with serve("trainer", servers.free_address(), env) as first:
            run_id = plane.submit(quickstart, train_config(tiny_model, nproc_per_node=2))
            plane.wait_for_event(run_id, lambda e: e.step == 2, "step 2", process=first)
            first.terminate()
            assert first.wait(timeout=60) == 0
        released = plane.wait_for_event(run_id, lambda e: e.kind == "released", "the release")
        release.touch()  # the next attempt holds before step 3 too
        with serve("trainer", servers.free_address(), env) as second:
            record = plane.wait_for_end(run_id, process=second)

    assert released.step == 2
    assert record.status == common_pb2.JOB_STATUS_SUCCEEDED, record.error
    assert (record.attempts, record.resumed_from_step) == (2, 2)
    assert len(record.loss_history) == STEPS


def test_a_cancel_ends_the_run_in_every_process_and_is_recorded_once(
    redis_url: str,
    s3_endpoint: str,
    model_cache: Path,
    quickstart: Path,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    """Cancelled while rank 0 holds before step 3: rank 0 records the cancel, the other process
    ends its run there too, both exit, and the worker acks the job."""
    env = stack_env(
        redis_url,
        s3_endpoint,
        model_cache,
        tmp_path / "home",
        TRAINER__CPU_DTYPE="float32",
        FAULT__HOLD_AT_STEP="3",
    )
    log = tmp_path / "worker.log"
    with (
        control_plane(env) as plane,
        serve("trainer", servers.free_address(), env, log_path=log) as worker,
    ):
        run_id = plane.submit(quickstart, train_config(tiny_model, nproc_per_node=2))
        plane.wait_for_event(run_id, lambda e: e.step == 2, "step 2", process=worker)
        connection = plane.connection
        connection.call(
            "trainer", connection.trainer.CancelRun, trainer_pb2.CancelRunRequest(run_id=run_id)
        )
        record = plane.wait_for_end(run_id, process=worker)
        servers.wait_until(
            lambda: plane.queue.pending_count(TRAIN_QUEUE) == 0, what="the ack", timeout=30
        )
        events = plane.events(run_id)

    assert record.status == common_pb2.JOB_STATUS_CANCELLED
    assert (len(record.loss_history), record.attempts) == (2, 1)
    assert [e.kind for e in events].count("ended") == 1
    assert "left to be delivered again" not in log.read_text(errors="replace")


def torchrun_node(env: dict[str, str], endpoint: str, run: str, log: Path) -> subprocess.Popen:
    """One "node" of a job across nodes, as deploy/k8s/multinode starts each pod's."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={run}",
        "--no-python",
        str(Path(sys.executable).parent / "backprop"),
        "serve",
        "trainer",
    ]
    with log.open("wb") as output:
        return subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)


def test_two_nodes_under_torchrun_train_one_job_as_one_group_and_both_exit_zero(
    redis_url: str,
    s3_endpoint: str,
    model_cache: Path,
    quickstart: Path,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    env = stack_env(
        redis_url,
        s3_endpoint,
        model_cache,
        tmp_path / "home",
        TRAINER__CPU_DTYPE="float32",
        TRAINER__THREADS="1",
    )
    endpoint = f"127.0.0.1:{servers.free_port()}"
    run = uuid.uuid4().hex
    with control_plane(env) as plane:
        run_id = plane.submit(quickstart, train_config(tiny_model))
        other = plane.submit(quickstart, train_config(tiny_model))  # for a later Job
        nodes = [torchrun_node(env, endpoint, run, tmp_path / f"node-{n}.log") for n in range(2)]
        try:
            exit_codes = [node.wait(timeout=240) for node in nodes]
        finally:
            for node in nodes:  # torchrun and its processes, should they still be running
                with suppress(psutil.NoSuchProcess):
                    for process in psutil.Process(node.pid).children(recursive=True):
                        process.kill()
                node.kill()
        record = plane.record(run_id)
        events = plane.events(run_id)
        assert plane.record(other).status == common_pb2.JOB_STATUS_QUEUED  # one job per Job

    logs = {n: (tmp_path / f"node-{n}.log").read_text(errors="replace")[-3000:] for n in range(2)}
    assert exit_codes == [0, 0], logs
    assert record.status == common_pb2.JOB_STATUS_SUCCEEDED, record.error
    assert (record.world_size, record.attempts) == (2, 1)
    # Rank 0 alone speaks: each step's event once, from the one attempt.
    assert [e.step for e in events if e.kind == "step"] == list(range(1, STEPS + 1))
    assert [e.message for e in events].count(STARTED_MESSAGE) == 1
