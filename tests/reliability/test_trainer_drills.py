"""Drills of the trainer's job ownership and resilience, with real processes and real faults.

Each drill runs one short training run on the real model through the stack's API (served from
the test process, see `control_plane`) while trainer workers are separate `backprop serve
trainer` processes that the drill kills (SIGKILL), stops (SIGTERM), freezes (SIGSTOP) or cuts
off from Redis and S3. A trainer to be killed, stopped or frozen holds its run before the next
step (`holding_at`), so the signal finds the run where the drill saw it, however fast the
machine trains. Each ends on what a user gets: the run's record, its loss history, its events
and the artifacts in the store.

1. A trainer killed mid-run: another one resumes from the last checkpoint.
2. A trainer told to stop: it checkpoints, releases the job without it counting as a failed
   delivery, and exits in time; another one resumes.
3. A trainer frozen past the visibility timeout: another one takes the job over; the frozen one,
   thawed, finds its lease lost and writes nothing (frozen between steps, or mid-checkpoint: what
   it finishes writing then is deleted).
4. A job that kills every trainer: failed and dead-lettered after `max_attempts`.
5. Redis restarted, S3 away, and an out-of-memory error, all in one run.
6. A campaign's trainer killed in its second run: another one finishes the campaign by
   redelivery, from the second run's checkpoint and the merge of the first.
"""

from __future__ import annotations

import hashlib
import signal
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from subprocess import Popen

import pytest
import servers
import torch
from cli_drills import holding_at
from service_processes import ControlPlane, control_plane, serve, stack_env

from backpropagate_api.layout import (
    TRAIN_QUEUE,
    adapter_prefix,
    checkpoint_prefix,
    checkpoints_prefix,
    loss_curve_key,
)
from backpropagate_api.settings import TrainerSettings
from backpropagate_api.v1 import common_pb2, trainer_pb2
from backpropagate_services.common.store.base import MANIFEST
from backpropagate_services.trainer.adapters.factors import read_adapter_dir
from backpropagate_services.trainer.loop.checkpoints import LOSS_WINDOW
from backpropagate_services.trainer.multirun.slao import Adapter, ContinualMerge
from backpropagate_services.trainer.runtime.worker import STARTED_MESSAGE

pytestmark = [pytest.mark.model]

STEPS = 8
CHECKPOINT_EVERY = 2
CONFIG = trainer_pb2.TrainConfig(
    steps=STEPS, batch_size=2, max_length=128, checkpoint_every=CHECKPOINT_EVERY
)
# Long enough that a trainer busy loading the model on two shared cores still renews its lease
# (every third of it); short enough that a takeover costs the drill little.
VISIBILITY_TIMEOUT_SECONDS = "5"
KEEP_LAST = TrainerSettings().keep_last_checkpoints  # the default checkpoint policy
KEEP_BEST = TrainerSettings().keep_best_checkpoints

Env = dict[str, str]
EventTest = Callable[[trainer_pb2.RunEvent], bool]


@pytest.fixture
def make_env(
    redis_url: str, s3_endpoint: str, model_cache: Path, tmp_path: Path
) -> Callable[..., Env]:
    """A fresh stack's environment (own Redis namespace and bucket) with extra settings."""
    return lambda **settings: stack_env(
        redis_url, s3_endpoint, model_cache, tmp_path / "home", **settings
    )


def trainer(env: Env, log: Path) -> AbstractContextManager[Popen[bytes]]:
    """A trainer worker process, its log kept at `log` (read by the drill, shown on failure)."""
    return serve("trainer", servers.free_address(), env, log_path=log)


# How a call retried through an outage (`common.jobs.durably`) logs each wait: "Retrying
# <call> in 0.5 seconds as it raised QueueUnavailableError: ...".
RETRIED_ON = "as it raised "


def wait_for_log(log: Path, text: str, what: str, process: Popen[bytes]) -> None:
    """Wait until a trainer's log says `text`: what it did, not how long it may have taken."""
    servers.wait_until(
        lambda: text in log.read_text(errors="replace"), what=what, timeout=120, process=process
    )


def started(attempt: int) -> EventTest:
    """The first event of an attempt, published before the model is loaded."""
    return lambda e: e.kind == "started" and e.attempt == attempt and e.message == STARTED_MESSAGE


def stepped(step: int, attempt: int = 1) -> EventTest:
    return lambda e: is_training_step(e) and e.step == step and e.attempt == attempt


def is_training_step(event: trainer_pb2.RunEvent) -> bool:
    """A step's report; the "saving adapter" event is of kind step too, but carries no loss."""
    return event.kind == "step" and event.loss > 0


def training_steps(events: list[trainer_pb2.RunEvent], attempt: int) -> list[int]:
    return [e.step for e in events if is_training_step(e) and e.attempt == attempt]


def recent_loss(loss_history: list[float], step: int) -> float:
    """A checkpoint's loss: the mean of the last LOSS_WINDOW steps up to its own."""
    window = loss_history[max(0, step - LOSS_WINDOW) : step]
    return sum(window) / len(window)


def expected_checkpoints(loss_history: list[float], *extra_steps: int) -> list[int]:
    """The steps whose checkpoints the default policy keeps, from the run's loss history: one
    every CHECKPOINT_EVERY steps, at the last step and at `extra_steps` (a release); then the
    newest KEEP_LAST and the KEEP_BEST lowest by loss."""
    written = sorted({*range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY), STEPS, *extra_steps})
    best = sorted(written, key=lambda step: (recent_loss(loss_history, step), -step))
    return sorted({*written[-KEEP_LAST:], *best[:KEEP_BEST]})


def checkpoint_dirs(plane: ControlPlane, run_id: str) -> dict[str, list[str]]:
    """The run's checkpoint directories in the store, with the files in each."""
    root = checkpoints_prefix(run_id) + "/"
    dirs: dict[str, list[str]] = {}
    for key in plane.store.list(root):
        name, _, file = key.removeprefix(root).partition("/")
        dirs.setdefault(name, []).append(file)
    return dirs


def assert_trained(plane: ControlPlane, record: trainer_pb2.RunRecord, *extra: int) -> None:
    """The run succeeded with one loss per step, its adapter and loss curve are in the store,
    and its checkpoints, in the record and in the store alike, are the ones the policy keeps."""
    run_id = record.run_id
    assert record.status == common_pb2.JOB_STATUS_SUCCEEDED, record.error
    assert len(record.loss_history) == STEPS
    assert all(loss > 0 for loss in record.loss_history)
    assert record.final_loss == record.loss_history[-1]
    assert record.output == adapter_prefix(run_id) + "/"
    adapter = set(plane.store.list(record.output))
    for name in (MANIFEST, "adapter_config.json", "adapter_model.safetensors"):
        assert record.output + name in adapter
    assert plane.store.exists(loss_curve_key(run_id))

    history = list(record.loss_history)
    kept = expected_checkpoints(history, *extra)
    assert record.last_checkpoint_step == STEPS
    assert [info.step for info in record.checkpoints] == kept
    for info in record.checkpoints:
        assert info.key in {
            checkpoint_prefix(run_id, info.step, attempt)
            for attempt in range(1, record.attempts + 1)
        }
        assert info.loss == pytest.approx(recent_loss(history, info.step))
        assert info.size_bytes > 0
    on_store = checkpoint_dirs(plane, run_id)
    kept_names = [
        info.key.removeprefix(checkpoints_prefix(run_id) + "/") for info in record.checkpoints
    ]
    assert sorted(on_store) == kept_names, "pruned or orphaned"
    for files in on_store.values():
        assert sorted(files) == sorted([MANIFEST, "checkpoint.json", "state.pt"])


def assert_resumed(
    events: list[trainer_pb2.RunEvent], record: trainer_pb2.RunRecord, checkpoint: int
) -> None:
    """The second attempt went on from `checkpoint`, the first step after it, without a gap."""
    assert record.attempts == 2
    assert [e.attempt for e in events if started(e.attempt)(e)] == [1, 2]
    assert record.resumed_from_step == checkpoint > 0
    assert training_steps(events, attempt=2) == list(range(checkpoint + 1, STEPS + 1))


def store_snapshot(plane: ControlPlane, run_id: str) -> dict[str, str]:
    """Every object the run has in the store, by content."""
    return {
        key: hashlib.sha256(plane.store.get_bytes(key)).hexdigest()
        for key in plane.store.list(f"runs/{run_id}/")
    }


def test_a_killed_trainer_run_is_resumed_from_its_last_checkpoint_by_another(
    make_env: Callable[..., Env],
    quickstart: Path,
    tmp_path: Path,
) -> None:
    env = make_env(QUEUE__VISIBILITY_TIMEOUT_SECONDS=VISIBILITY_TIMEOUT_SECONDS)
    started_at = time.monotonic()
    with (
        control_plane(env) as plane,
        trainer(holding_at(env, 4), tmp_path / "first.log") as first,
    ):
        run_id = plane.submit(quickstart, CONFIG)
        plane.wait_for_event(run_id, started(1), "the first trainer's start", process=first)
        # Up meanwhile, idle: the job is the first trainer's as long as it renews its lease.
        with trainer(env, tmp_path / "second.log") as second:
            # Past its first checkpoint, mid-way to the next one.
            plane.wait_for_event(run_id, stepped(3), "step 3", process=first)
            first.send_signal(signal.SIGKILL)  # no handler runs: as a power cut
            first.wait()
            killed = plane.record(run_id)
            record = plane.wait_for_end(run_id, process=second)
        events = plane.events(run_id)
        assert_trained(plane, record)
        runs = plane.connection.trainer.ListRuns(trainer_pb2.ListRunsRequest()).runs

    checkpoint = killed.last_checkpoint_step
    assert killed.status == common_pb2.JOB_STATUS_RUNNING
    assert checkpoint >= CHECKPOINT_EVERY
    assert_resumed(events, record, checkpoint)
    first_attempt = training_steps(events, attempt=1)
    assert first_attempt == list(range(1, first_attempt[-1] + 1))
    assert first_attempt[-1] > checkpoint, "the kill came before any step was lost"
    # Steps trained again after the checkpoint give the losses the first trainer saw: the
    # checkpoint holds everything (weights, optimizer, RNG, data order) the run depends on.
    first_losses = [e.loss for e in events if is_training_step(e) and e.attempt == 1]
    assert list(record.loss_history[: len(first_losses)]) == pytest.approx(first_losses, rel=1e-4)
    assert [run.run_id for run in runs] == [run_id]  # one record, however many attempts
    print(
        f"killed after step {first_attempt[-1]}, resumed from step {checkpoint}, "
        f"attempts {record.attempts}, drill {time.monotonic() - started_at:.0f} s"
    )


def test_a_stopped_trainer_checkpoints_and_releases_its_job_without_spending_an_attempt(
    make_env: Callable[..., Env], quickstart: Path, tmp_path: Path
) -> None:
    grace = 20.0
    # One delivery allowed: were the release counted as a failed one, the job would be
    # dead-lettered instead of resumed.
    env = make_env(
        QUEUE__VISIBILITY_TIMEOUT_SECONDS=VISIBILITY_TIMEOUT_SECONDS,
        QUEUE__MAX_ATTEMPTS="1",
        TRAINER__SHUTDOWN_GRACE_SECONDS=str(grace),
    )
    started_at = time.monotonic()
    with control_plane(env) as plane:
        with trainer(holding_at(env, 4), tmp_path / "first.log") as first:
            run_id = plane.submit(quickstart, CONFIG)
            plane.wait_for_event(run_id, stepped(3), "step 3", process=first)
            first.send_signal(signal.SIGTERM)  # what `docker stop` and Kubernetes send
            signalled = time.monotonic()
            first.wait(timeout=grace + 10)
            exit_seconds = time.monotonic() - signalled
        released = plane.record(run_id)
        [release] = [e for e in plane.events(run_id) if e.kind == "released"]
        job_waits = plane.queue.is_pending(TRAIN_QUEUE, released.job_id)
        held = plane.queue.pending_count(TRAIN_QUEUE)

        with trainer(env, tmp_path / "second.log") as second:
            record = plane.wait_for_end(run_id, process=second)
        events = plane.events(run_id)
        assert_trained(plane, record, release.step)
        dead = plane.queue.dead_letters(TRAIN_QUEUE)

    assert first.returncode == 0
    assert exit_seconds < grace
    # Released where it stopped: record waiting, checkpoint of the last step done, job queued.
    assert released.status == common_pb2.JOB_STATUS_QUEUED
    assert release.attempt == 1
    assert release.step == released.last_checkpoint_step == training_steps(events, 1)[-1]
    assert release.step > CHECKPOINT_EVERY
    assert job_waits and held == 0, "the released job is not waiting for the next worker"
    assert_resumed(events, record, release.step)
    assert dead == []
    assert record.job_id == released.job_id  # the same job, delivered again
    print(
        f"released at step {release.step}, exited {exit_seconds:.1f} s after SIGTERM, "
        f"attempts {record.attempts}, drill {time.monotonic() - started_at:.0f} s"
    )


@pytest.mark.parametrize("frozen_in", ["step", "checkpoint"])
def test_a_frozen_trainer_loses_its_job_to_another_and_writes_nothing_once_thawed(
    frozen_in: str,
    make_env: Callable[..., Env],
    s3_endpoint: str,
    quickstart: Path,
    tmp_path: Path,
) -> None:
    env = make_env(QUEUE__VISIBILITY_TIMEOUT_SECONDS=VISIBILITY_TIMEOUT_SECONDS)
    # Between steps: held before step 4. Mid-checkpoint: held by S3, cut, in step 4's.
    frozen_env = holding_at(env, 4) if frozen_in == "step" else env
    frozen_log = tmp_path / "frozen.log"
    s3_port = servers.free_port()
    started_at = time.monotonic()
    with (
        # The trainer to freeze reaches S3 through a forwarder, to hold it inside a checkpoint.
        servers.Restartable(lambda: servers.tcp_forwarder(s3_port, s3_endpoint)) as its_s3,
        control_plane(env) as plane,
        trainer(
            {**frozen_env, "BACKPROPAGATE_STORE__S3_ENDPOINT": its_s3.address}, frozen_log
        ) as frozen,
    ):
        run_id = plane.submit(quickstart, CONFIG)
        plane.wait_for_event(run_id, started(1), "the first trainer's start", process=frozen)
        with trainer(env, tmp_path / "second.log") as second:
            plane.wait_for_event(run_id, stepped(3), "step 3", process=frozen)
            # Frozen, heartbeat included, as by a stalled VM, a debugger or a swap storm:
            # before step 4, or in the middle of writing its checkpoint (waiting for S3).
            if frozen_in == "step":
                frozen.send_signal(signal.SIGSTOP)
            else:
                with its_s3.down():
                    plane.wait_for_event(run_id, stepped(4), "step 4", process=frozen)
                    frozen.send_signal(signal.SIGSTOP)
            try:
                record = plane.wait_for_end(run_id, process=second)
                assert_trained(plane, record)
                before_thaw = store_snapshot(plane, run_id), plane.events(run_id)
            finally:
                frozen.send_signal(signal.SIGCONT)
            # It first ends what it was frozen in.
            wait_for_log(frozen_log, "stopped without writing", "the job given up", frozen)
            after_thaw = store_snapshot(plane, run_id), plane.events(run_id)
        thawed_still_serves = frozen.poll() is None

    snapshot, events = before_thaw
    assert after_thaw == before_thaw, "the thawed trainer wrote after losing its lease"
    assert "lost the lease on job" in frozen_log.read_text()
    assert thawed_still_serves
    assert_resumed(events, record, record.resumed_from_step)
    assert record.resumed_from_step >= CHECKPOINT_EVERY
    assert training_steps(events, attempt=1)[-1] == (3 if frozen_in == "step" else 4)
    print(
        f"frozen in a {frozen_in}, taken over at step {record.resumed_from_step}, "
        f"attempts {record.attempts}, {len(snapshot)} objects unchanged after the thaw, "
        f"drill {time.monotonic() - started_at:.0f} s"
    )


def test_a_job_that_kills_every_trainer_is_failed_and_dead_lettered(
    make_env: Callable[..., Env], quickstart: Path, tmp_path: Path
) -> None:
    max_attempts = 2
    env = make_env(QUEUE__VISIBILITY_TIMEOUT_SECONDS="2", QUEUE__MAX_ATTEMPTS=str(max_attempts))
    started_at = time.monotonic()
    with control_plane(env) as plane:
        run_id = plane.submit(quickstart, CONFIG)
        for attempt in range(1, max_attempts + 1):
            with trainer(holding_at(env, 1), tmp_path / f"killed-{attempt}.log") as doomed:
                plane.wait_for_event(run_id, started(attempt), f"start {attempt}", process=doomed)
                doomed.send_signal(signal.SIGKILL)  # as a job that crashes its worker would
                doomed.wait()
        with trainer(env, tmp_path / "last.log") as last:
            record = plane.wait_for_end(run_id, process=last)
            events = plane.events(run_id)
            dead = plane.queue.dead_letters(TRAIN_QUEUE)
            run_objects = plane.store.list(f"runs/{run_id}/")
            job_pending = plane.queue.is_pending(TRAIN_QUEUE, record.job_id)
        last_log = (tmp_path / "last.log").read_text()

    assert record.status == common_pb2.JOB_STATUS_FAILED
    assert record.error.code == "RUNTIME_JOB_ATTEMPTS_EXHAUSTED"
    assert record.attempts == max_attempts  # the last trainer never started it
    [letter] = dead
    assert letter.job_id == record.job_id
    assert letter.payload == {"run_id": run_id}
    assert letter.deliveries == max_attempts + 1
    assert not job_pending
    assert run_objects == [f"runs/{run_id}/run.json"], "nothing but the record is written"
    assert [e.attempt for e in events if e.kind == "started"] == [1, 2]
    [ended] = [e for e in events if e.kind == "ended"]
    assert ended.status == common_pb2.JOB_STATUS_FAILED
    assert "dead-lettered" in last_log
    print(
        f"dead-lettered after {letter.deliveries} deliveries, attempts {record.attempts}, "
        f"drill {time.monotonic() - started_at:.0f} s"
    )


def test_a_run_rides_out_a_redis_restart_an_s3_outage_and_an_out_of_memory_error(
    s3_endpoint: str, model_cache: Path, quickstart: Path, tmp_path: Path
) -> None:
    redis_port, s3_port = servers.free_port(), servers.free_port()
    (tmp_path / "redis").mkdir()
    log = tmp_path / "trainer.log"
    started_at = time.monotonic()
    with (
        # Its own Redis, persistent so that a restart keeps the job and the events.
        servers.Restartable(lambda: servers.redis_server(redis_port, tmp_path / "redis")) as redis,
        # The trainer reaches moto through a forwarder: cut, S3 is away; moto keeps its objects.
        servers.Restartable(lambda: servers.tcp_forwarder(s3_port, s3_endpoint)) as s3,
    ):
        release = tmp_path / "release"
        env = stack_env(
            redis.address,
            s3.address,
            model_cache,
            tmp_path / "home",
            FAULT__OOM_AT_STEP="2",
            # Held after the checkpoint of step STEPS - 2 until both outages have begun: the
            # last steps and checkpoint meet them, however fast this machine trains.
            FAULT__HOLD_AT_STEP=str(STEPS - 1),
            FAULT__HOLD_RELEASE_FILE=str(release),
        )
        api_env = {**env, "BACKPROPAGATE_STORE__S3_ENDPOINT": s3_endpoint}  # not cut off
        with control_plane(api_env) as plane, trainer(env, log) as worker:
            run_id = plane.submit(quickstart, CONFIG)
            checkpointed = plane.wait_for_event(
                run_id,
                lambda e: e.kind == "checkpoint" and e.step == STEPS - 2,
                "checkpoint",
                process=worker,
            )
            with s3.down():
                with redis.down():
                    redis_down_at = time.time()
                    release.touch()
                    # The last steps are trained, their events kept; the last checkpoint's
                    # lease check then waits for Redis. Its retries, not the heartbeat's failed
                    # renewals, which begin when Redis goes, however far the steps have got.
                    wait_for_log(log, "events kept", "events kept while Redis is away", worker)
                    redis_wait = RETRIED_ON + "QueueUnavailableError"
                    wait_for_log(log, redis_wait, "the last checkpoint's wait for Redis", worker)
                redis_back_at = time.time()
                # The last checkpoint and the adapter now wait for S3.
                s3_wait = RETRIED_ON + "StoreUnavailableError"
                wait_for_log(log, s3_wait, "a wait for S3", worker)
            record = plane.wait_for_end(run_id, process=worker)
            events = plane.events(run_id)
            assert_trained(plane, record)
            job_pending = plane.queue.is_pending(TRAIN_QUEUE, record.job_id)

    assert record.attempts == 1, "an outage made the job be delivered again"
    assert not job_pending
    # Every step's event exactly once, in order; the ones published while Redis was away
    # arrived late, none lost.
    assert training_steps(events, attempt=1) == list(range(1, STEPS + 1))
    late = [
        e for e in events if is_training_step(e) and redis_down_at < e.timestamp < redis_back_at
    ]
    assert [e.step for e in late] == [STEPS - 1, STEPS], "not the steps after the hold"
    checkpoints = [e.step for e in events if e.kind == "checkpoint"]
    assert checkpoints == list(range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY))
    assert checkpointed.step in checkpoints
    assert [e.kind for e in events].count("ended") == 1
    assert events[-1].kind == "ended"
    # The out-of-memory error at step 2: the micro-batch halved, the step taken again, once.
    [oom] = [e for e in events if e.kind == "oom_recovered"]
    assert (oom.step, oom.batch_size, oom.gradient_accumulation) == (1, 1, 2)
    assert record.oom_recoveries == 1
    assert (record.batch_size, record.gradient_accumulation) == (CONFIG.batch_size // 2, 2)
    print(
        f"{len(late)} steps trained while Redis was away, OOM recovered at step 2, "
        f"attempts {record.attempts}, drill {time.monotonic() - started_at:.0f} s"
    )


def stored_adapter(plane: ControlPlane, run_id: str, into: Path) -> Adapter:
    return read_adapter_dir(plane.store.get_dir(adapter_prefix(run_id), into / run_id))


def test_a_killed_trainer_campaign_is_finished_by_another_from_its_second_runs_checkpoint(
    make_env: Callable[..., Env], quickstart: Path, tmp_path: Path
) -> None:
    env = make_env(QUEUE__VISIBILITY_TIMEOUT_SECONDS=VISIBILITY_TIMEOUT_SECONDS)
    started_at = time.monotonic()
    campaign = trainer_pb2.MultiRunConfig(runs=3, samples_per_run=3, merge="slao")
    in_second_run = "run 2's step 3"
    with (
        control_plane(env) as plane,
        trainer(holding_at(env, STEPS + 4), tmp_path / "first.log") as first,
    ):
        campaign_id = plane.submit_campaign(quickstart, CONFIG, campaign)
        with trainer(env, tmp_path / "second.log") as second:
            plane.wait_for_event(
                campaign_id,
                lambda e: is_training_step(e) and e.campaign_run == 2 and e.step == 3,
                in_second_run,
                timeout=300,  # a whole run and a model load before it
                process=first,
            )
            first.send_signal(signal.SIGKILL)
            first.wait()
            killed = plane.record(campaign_id)
            record = plane.wait_for_end(campaign_id, process=second)
        children = [plane.record(run_id) for run_id in record.campaign.run_ids]
        adapters = [stored_adapter(plane, run_id, tmp_path) for run_id in record.campaign.run_ids]
        merged = stored_adapter(plane, campaign_id, tmp_path)

    assert killed.status == common_pb2.JOB_STATUS_RUNNING
    assert [point.run for point in killed.campaign.timeline] == [1]  # run 2 not merged yet
    assert record.status == common_pb2.JOB_STATUS_SUCCEEDED, record.error
    assert record.attempts == 2
    assert [point.run for point in record.campaign.timeline] == [1, 2, 3]
    assert [child.attempts for child in children] == [1, 2, 1]  # run 1 not trained again
    assert children[1].resumed_from_step >= CHECKPOINT_EVERY
    assert all(len(child.loss_history) == STEPS for child in children)
    assert len(record.loss_history) == 3 * STEPS
    # The merged adapter in the store is SLAO of the three runs' stored adapters, as if the
    # campaign had never stopped merging.
    expected = ContinualMerge("slao")
    for adapter in adapters:
        expected.add(adapter)
    assert set(merged) == set(expected.merged)
    for name, layer in merged.items():
        assert torch.allclose(layer.a, expected.merged[name].a, atol=1e-6), name
        assert torch.allclose(layer.b, expected.merged[name].b, atol=1e-6), name
    print(
        f"killed in run 2 at step 3, run 2 resumed from step {children[1].resumed_from_step}, "
        f"drill {time.monotonic() - started_at:.0f} s"
    )
