"""The detached worker that `backprop train --detach` and `Trainer.train(wait=False)` start is
the embedded default in a process of its own: it answers no call that lacks its own random
token, keeps the home directory readable by its owner only, and works in the home of the
settings it was started with.

The worker is a real process started as `--detach` starts it; the calls come from a plain gRPC
channel, as another user of the machine would make them.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import servers

from backpropagate import Trainer
from backpropagate.background import DetachedWorker, start_background_worker
from backpropagate_api.grpc_errors import error_from_rpc
from backpropagate_api.settings import SafetySettings, Settings
from backpropagate_api.v1 import dataprep_pb2, dataprep_pb2_grpc, trainer_pb2, trainer_pb2_grpc

SERVING = re.compile(r"serving .* on (\S+:\d+)")


def serving_address(log: Path, worker: DetachedWorker) -> str:
    """The address the worker says it listens on, once it says so."""
    found: list[str] = []

    def said() -> bool:
        found[:] = SERVING.findall(log.read_text(errors="replace"))
        return bool(found)

    servers.wait_until(said, what="the detached worker", timeout=120, process=worker.process)
    return found[0]


@dataclass
class Worker:
    home: Path
    address: str
    dataset_id: str  # a dataset this user uploaded: another user must not read it


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory, quickstart: Path, model_cache: Path
) -> Iterator[Worker]:
    home = tmp_path_factory.mktemp("owner") / "home"
    settings = Settings(home=home, model_cache=model_cache, safety=SafetySettings(source="host"))
    # The user's own process writes the store first (its embedded stack), then starts the worker.
    dataset = Trainer(settings=settings, progress=False).inspect_data(quickstart)
    detached = start_background_worker(settings)
    try:
        yield Worker(home, serving_address(detached.log, detached), dataset.dataset_id)
    finally:
        detached.process.terminate()
        detached.process.wait(timeout=60)


def other_users_calls(channel: grpc.Channel, dataset_id: str) -> dict[str, Callable[[], object]]:
    """What another local user did with plain gRPC calls to an open worker."""
    trainer = trainer_pb2_grpc.TrainerServiceStub(channel)
    dataprep = dataprep_pb2_grpc.DataprepServiceStub(channel)
    return {
        "list the runs": lambda: trainer.ListRuns(trainer_pb2.ListRunsRequest(), timeout=10),
        "read a dataset's first row": lambda: dataprep.InspectDataset(
            dataprep_pb2.InspectDatasetRequest(dataset_id=dataset_id), timeout=10
        ),
        "cancel a run": lambda: trainer.CancelRun(
            trainer_pb2.CancelRunRequest(run_id="run-20261201T120000-abcdef"), timeout=10
        ),
    }


@pytest.mark.parametrize("call", ["list the runs", "read a dataset's first row", "cancel a run"])
def test_the_detached_worker_refuses_a_call_without_its_token(worker: Worker, call: str) -> None:
    with grpc.insecure_channel(worker.address) as channel, pytest.raises(grpc.RpcError) as refused:
        other_users_calls(channel, worker.dataset_id)[call]()

    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_from_rpc(refused.value, worker.address).code == "INPUT_AUTH_FAILED"


def test_the_home_its_store_queue_and_logs_are_readable_by_their_owner_only(
    worker: Worker,
) -> None:
    entries = {
        path.relative_to(worker.home).as_posix(): path
        for path in [worker.home, *worker.home.rglob("*")]
    }
    assert {"queue.sqlite3", "artifacts/datasets", "logs/embedded.log"} <= entries.keys()
    assert any(name.startswith("logs/worker-") for name in entries)

    modes = {name: stat.S_IMODE(path.stat().st_mode) for name, path in entries.items()}
    assert modes == {name: 0o700 if path.is_dir() else 0o600 for name, path in entries.items()}


@pytest.mark.model
def test_a_run_submitted_without_waiting_is_trained_in_the_trainers_own_home(
    tmp_path: Path, quickstart: Path, model_cache: Path
) -> None:
    settings = Settings(home=tmp_path / "elsewhere", model_cache=model_cache)
    trainer = Trainer(settings=settings, progress=False)

    queued = trainer.train(quickstart, steps=2, batch_size=2, max_length=64, wait=False)

    # The worker started for it must take it from this home's queue, not the default home's.
    servers.wait_until(
        lambda: trainer.run(queued.run_id).status != "queued",
        what=f"a worker taking {queued.run_id}",
        timeout=120,
        interval=1,
    )
    finished = trainer.watch(queued.run_id)
    assert finished.status == "succeeded"
    assert finished.loss_history and len(finished.loss_history) == 2
