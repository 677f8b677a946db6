"""One process of a run trained by several: the entry point torchrun starts, on one machine for
the worker that claimed the job (`launcher`), or on every node of a job across nodes
(`backprop serve trainer` under torchrun, as deploy/k8s/multinode runs it).

Every process joins the group (`ranks`), then:
- rank 0 speaks for the run. Handed a job by the worker that claimed it, it holds the job's
  lease as that worker and writes back how the attempt ended; started by torchrun alone (a job
  across nodes), it claims the next train job itself and acks or releases it as a pool worker
  would. Either way it runs the attempt as a worker training alone does, handing the others
  their orders (`worker.Orders`) as it starts.
- every other rank waits for those orders and follows: the same setup, its share of each step,
  rank 0's verdict at each step's boundary. It writes nothing and obeys no signal: rank 0
  decides (a SIGTERM makes rank 0 checkpoint and release the job, and end the others' run).

No process binds a port: the API is the trainer service's. Exit codes: 0 once the job has ended
(every rank, so that an indexed Job completes); otherwise (released at shutdown, a peer lost)
non-zero, so that torchrun and the Job try again and the job goes on from its checkpoint.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path

import psutil
from torch.distributed.elastic.multiprocessing.errors import record as report_errors

from backpropagate_api.layout import TRAIN_QUEUE
from backpropagate_api.settings import Settings, get_settings
from backpropagate_api.statuses import TERMINAL_STATUSES
from backpropagate_services.common.jobs import (
    CLAIM_TIMEOUT_SECONDS,
    JobInterrupted,
    consumer_name,
    kept_alive,
)
from backpropagate_services.common.logs import configure_logging
from backpropagate_services.common.queue import Job
from backpropagate_services.common.runtime import Runtime
from backpropagate_services.trainer.runtime.launcher import Handoff, read_handoff, write_outcome
from backpropagate_services.trainer.runtime.ranks import IDLE, Ranks, RanksLost, RunEnded
from backpropagate_services.trainer.runtime.safety_monitor import SafetyMonitor
from backpropagate_services.trainer.runtime.worker import Orders, TrainWorker

log = logging.getLogger(__name__)

WORKER_WATCH_SECONDS = 1.0


def run_ranks(settings: Settings, handoff: Handoff | None = None) -> int:
    """This process's part in one job; its exit code."""
    ranks = Ranks.join(settings.trainer.collective_timeout_seconds)
    runtime = Runtime.from_settings(settings)
    try:
        if ranks.speaks:
            return _speak(runtime, ranks, handoff)
        return _follow(runtime, ranks)
    finally:
        runtime.close()
        ranks.leave()


def _speak(runtime: Runtime, ranks: Ranks, handoff: Handoff | None) -> int:
    """Rank 0: the job's attempt, as a worker training alone runs it."""
    safety = SafetyMonitor.for_settings(runtime.settings)
    safety.start()
    worker = TrainWorker(runtime, safety, ranks)
    for stop in (signal.SIGTERM, signal.SIGINT):  # torchrun passes the worker's shutdown on
        signal.signal(stop, lambda *_: worker.stop(0))
    try:
        if handoff is not None:
            worker.consumer = handoff.consumer
            _stop_when_gone(worker, handoff.worker_pid)
            interrupted = _attempt(worker, handoff.job)
            write_outcome(handoff, interrupted)
            return 0 if interrupted is None else 1
        worker.consumer = consumer_name(worker.name)
        job = _claim(worker, ranks)
        if job is None:
            return 1
        worker.run_claimed(job)
        return 0 if worker.job_record(job).status in TERMINAL_STATUSES else 1
    finally:
        if ranks.world > 1 and not worker.followers_told:  # nothing for them to train
            with suppress(RanksLost):
                ranks.from_voice(None)
        safety.stop()


def _attempt(worker: TrainWorker, job: Job) -> JobInterrupted | None:
    """Handle a job another process claimed, holding its lease as that process; None once
    its outcome is recorded, else why the attempt left it."""
    with kept_alive(worker.queue, job, worker.consumer, worker.heartbeat_interval) as lease:
        worker.lease = lease
        try:
            worker.handle(job)
        except JobInterrupted as interrupted:
            return interrupted
    return None


def _claim(worker: TrainWorker, ranks: Ranks) -> Job | None:
    """The next train job (None if asked to stop first), the others kept waiting meanwhile."""
    while not worker.stopping:
        job = worker.queue.claim(TRAIN_QUEUE, worker.consumer, CLAIM_TIMEOUT_SECONDS)
        if job is not None:
            return job
        ranks.from_voice(IDLE)
    return None


def _stop_when_gone(worker: TrainWorker, pid: int) -> None:
    """Stop (checkpointing, as at a shutdown) if the worker that started these processes is
    gone: nobody would act on what rank 0 reports."""

    def watch() -> None:
        while not worker.stopping:
            if not psutil.pid_exists(pid):
                log.warning("the worker that started this run (pid %d) is gone: stopping", pid)
                worker.stop(0)
                return
            time.sleep(WORKER_WATCH_SECONDS)

    threading.Thread(target=watch, name="worker-watch", daemon=True).start()


def _follow(runtime: Runtime, ranks: Ranks) -> int:
    """A rank other than 0: train what rank 0 hands out, as it leads."""
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, signal.SIG_IGN)  # rank 0 decides; torchrun kills after the grace
    orders = ranks.wait_for_orders()
    if orders is None:
        return 0
    assert isinstance(orders, Orders)
    worker = TrainWorker(runtime, SafetyMonitor(None), ranks)
    try:
        worker.follow(orders)
    except RunEnded as ended:
        log.info("rank %d: rank 0 ended the run%s", ranks.rank, f" ({ended})" if str(ended) else "")
    return 0


@report_errors  # an uncaught error goes into torchrun's summary of the failure
def main() -> int:
    """`python -m backpropagate_services.trainer.runtime.rank_process [HANDOFF]`."""
    handoff = read_handoff(Path(sys.argv[1])) if len(sys.argv) > 1 else None
    settings = handoff.settings if handoff else get_settings()
    configure_logging(settings.log_level, json_lines=settings.log_json)
    return run_ranks(settings, handoff)


if __name__ == "__main__":
    sys.exit(main())
