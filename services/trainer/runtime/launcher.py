"""A worker's side of a run trained by several processes on its machine: it starts them under
torch's elastic launcher and waits, holding the job's lease, while they train.

The command is `python -m torch.distributed.run --standalone --nproc-per-node N -m
backpropagate_services.trainer.runtime.rank_process HANDOFF`: torchrun starts N processes with
RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, checks on them every monitor interval, and
when one dies stops the others (SIGTERM, SIGKILL after the shutdown grace) and exits non-zero.
It restarts nothing (--max-restarts 0): the job's redelivery is the restart, and it resumes
from the last checkpoint. The handoff file, private to this user (it holds the settings'
secrets), gives the processes the settings, the claimed job and this worker's consumer name:
rank 0 holds the lease as this worker, records the run, and writes back how the attempt ended.

A shutdown of this worker (SIGTERM) is passed on to torchrun, which passes it on to its
processes: rank 0 checkpoints and releases the job, as a worker training alone would.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from backpropagate_api.private_files import private_opener
from backpropagate_api.settings import Settings
from backpropagate_services.common.jobs import JobInterrupted
from backpropagate_services.common.queue import Job
from backpropagate_services.trainer.runtime.ranks import RanksLost

log = logging.getLogger(__name__)

RANK_MODULE = "backpropagate_services.trainer.runtime.rank_process"
# How often torchrun looks at its processes: a dead one stops the others within about this.
MONITOR_SECONDS = 1.0
POLL_SECONDS = 0.5


@dataclass(frozen=True)
class Handoff:
    """What a worker hands the processes it starts for a job."""

    settings: Settings
    job: Job
    consumer: str  # the worker's: rank 0 touches, confirms and records as this worker
    worker_pid: int  # rank 0 stops (checkpointing) if this process is gone
    outcome: Path  # rank 0 writes here how the attempt ended (`write_outcome`)


def write_outcome(handoff: Handoff, interrupted: JobInterrupted | None) -> None:
    """Rank 0: None once the run's outcome is recorded, else why the attempt left the job
    (released at shutdown, the lease lost, the queue or store away), for the worker to act on
    as if it had trained the run itself."""
    with open(handoff.outcome, "wb", opener=private_opener) as handle:
        pickle.dump(interrupted, handle)


def read_handoff(path: Path) -> Handoff:
    with path.open("rb") as handle:
        handoff: Handoff = pickle.load(handle)
    return handoff


def train_in_processes(
    settings: Settings,
    job: Job,
    consumer: str,
    processes: int,
    stopping: Callable[[], bool],
) -> None:
    """Train the job's run in `processes` processes and return once its outcome is recorded;
    raise what rank 0 reports instead (ReleasedForShutdown, LeaseLost, ...), or RanksLost if
    the processes ended before rank 0 recorded anything (one died: the job is delivered
    again). `stopping`: this worker's shutdown, passed on to them."""
    with tempfile.TemporaryDirectory(prefix="bp-ranks-") as directory:  # mode 0700
        outcome = Path(directory) / "outcome.pickle"
        handoff = Path(directory) / "handoff.pickle"
        with open(handoff, "wb", opener=private_opener) as handle:
            pickle.dump(Handoff(settings, job, consumer, os.getpid(), outcome), handle)
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
            "--max-restarts=0",
            f"--monitor-interval={MONITOR_SECONDS}",
            f"--shutdown-timeout={settings.trainer.shutdown_grace_seconds:g}",
            "-m",
            RANK_MODULE,
            str(handoff),
        ]
        log.info("training job %s in %d processes", job.job_id, processes)
        log_file = _log_file()
        # Its own session: a terminal's Ctrl-C reaches this worker, which decides.
        launch = subprocess.Popen(
            command,
            env=_environment(settings, processes),
            stdout=log_file,
            stderr=subprocess.STDOUT if log_file else None,
            start_new_session=True,
        )
        exit_code = _wait(launch, stopping)
        ended: JobInterrupted | str | None = "no outcome"
        if outcome.exists():
            with outcome.open("rb") as handle:
                ended = pickle.load(handle)
    if ended is None:
        return
    if isinstance(ended, JobInterrupted):
        raise ended
    raise RanksLost(
        f"The {processes} processes training job {job.job_id} ended (torchrun exit code "
        f"{exit_code}) before rank 0 recorded an outcome: one of them died (torchrun's summary "
        "in this worker's log names it). The job is delivered again and resumes from its last "
        "checkpoint."
    )


def _environment(settings: Settings, processes: int) -> dict[str, str]:
    """The processes' environment: each with its share of the CPU's threads (torchrun would
    give each one), unless the settings or the environment say otherwise."""
    threads = settings.trainer.threads or max(1, (os.cpu_count() or 1) // processes)
    return {"OMP_NUM_THREADS": str(threads), **os.environ}


def _log_file() -> IO[str] | None:
    """The file this worker logs to, if any (the embedded stack's: the terminal belongs to the
    progress bar): the processes' output goes there too. None: they share this one's stderr."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.stream
    return None


def _wait(process: subprocess.Popen[bytes], stopping: Callable[[], bool]) -> int:
    """torchrun's exit code; this worker's shutdown is passed on to it once."""
    signalled = False
    while True:
        try:
            return process.wait(timeout=POLL_SECONDS)
        except subprocess.TimeoutExpired:
            if stopping() and not signalled:
                process.send_signal(signal.SIGTERM)
                signalled = True
