"""A stack that names an export's file outside the directory it is downloaded into gets nothing
written there: `backprop export --output-dir`, `backprop runs save`, `backprop chat RUN` and the
SDK's `Trainer.export` refuse the name with INPUT_PATH_OUTSIDE_DIRECTORY before writing a byte.

The stack is real (the trainer and export services on a loopback port, over their queue and
store); only its export worker is a hostile one, as a tampered stack or an edited export record
would be: it finishes every export job with one file under the name the test chose for its run.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from service_processes import in_process_stack

from backpropagate import Trainer
from backpropagate_api.errors import PathOutsideDirectoryError
from backpropagate_api.ids import new_id
from backpropagate_api.layout import (
    EXPORT_QUEUE,
    export_events_channel,
    export_file_key,
    export_record_key,
    run_record_key,
)
from backpropagate_api.settings import SafetySettings, Settings
from backpropagate_api.v1 import common_pb2, export_pb2, trainer_pb2
from backpropagate_services.common.records import load_record, publish, save_record
from backpropagate_services.common.runtime import Runtime

BACKPROP = str(Path(sys.executable).parent / "backprop")
WORKER = "hostile-export-worker"
CONTENT = b"export-written-by-a-hostile-stack\n"
USERS_OWN = b"# the user's own shell setup\n"


@dataclass
class HostileStack:
    address: str
    runtime: Runtime
    names: dict[str, str] = field(default_factory=dict)  # run id: its exports' file name

    def run_exported_as(self, name: str) -> str:
        """A new succeeded run whose exports come back with one file named `name`."""
        run_id = new_id("run")
        record = trainer_pb2.RunRecord(
            run_id=run_id, status=common_pb2.JOB_STATUS_SUCCEEDED, created_at=time.time()
        )
        save_record(self.runtime.store, run_record_key(run_id), record)
        self.names[run_id] = name
        return run_id

    def finish_exports(self, stop: threading.Event) -> None:
        """The hostile export worker: every export job ends at once, succeeded, listing one
        stored file under its run's chosen name."""
        queue, store = self.runtime.queue, self.runtime.store
        while not stop.is_set():
            job = queue.claim(EXPORT_QUEUE, WORKER, 0.2)
            if job is None:
                continue
            record_key = export_record_key(str(job.payload["export_id"]))
            result = load_record(store, record_key, export_pb2.ExportResult, "export")
            key = export_file_key(result.export_id, "model.gguf")
            store.put_bytes(key, CONTENT)
            result.status = common_pb2.JOB_STATUS_SUCCEEDED
            result.files.add(
                name=self.names[result.run_id],
                key=key,
                size_bytes=len(CONTENT),
                sha256=hashlib.sha256(CONTENT).hexdigest(),
            )
            save_record(store, record_key, result)
            event = export_pb2.ExportEvent(
                export_id=result.export_id, run_id=result.run_id, status=result.status
            )
            publish(queue, export_events_channel(result.export_id), event)
            queue.ack(job, WORKER)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileStack]:
    settings = Settings(home=tmp_path_factory.mktemp("stack"), safety=SafetySettings(source="host"))
    with in_process_stack(settings, ["trainer", "export"], start_workers=False) as running:
        hostile = HostileStack(running.address, running.runtime)
        stop = threading.Event()
        worker = threading.Thread(target=hostile.finish_exports, args=(stop,), daemon=True)
        worker.start()
        try:
            yield hostile
        finally:
            stop.set()
            worker.join()


@dataclass
class User:
    """A user's directory tree: a home with its own .bashrc, the client's home, a work dir."""

    root: Path
    stack: HostileStack

    @property
    def client_home(self) -> Path:
        return self.root / "home" / "backpropagate"

    @property
    def work(self) -> Path:
        return self.root / "home" / "work"

    def files(self) -> dict[Path, bytes]:
        return {path: path.read_bytes() for path in self.root.rglob("*") if path.is_file()}

    def backprop(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A `backprop` command of this user, against the hostile stack."""
        env = {key: value for key, value in os.environ.items() if key != "BACKPROPAGATE_TOKEN"}
        env |= {
            "BACKPROPAGATE_ENDPOINT": self.stack.address,
            "BACKPROPAGATE_HOME": str(self.client_home),
            "COLUMNS": "200",
        }
        return subprocess.run(
            [BACKPROP, *args], env=env, capture_output=True, text=True, timeout=120, check=False
        )


def cli_refuses(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 1, done.stdout + done.stderr
    assert "error INPUT_PATH_OUTSIDE_DIRECTORY" in done.stderr


def export_command(user: User, run_id: str) -> None:
    cli_refuses(user.backprop("export", run_id, "--output-dir", str(user.work / "out")))


def runs_save_command(user: User, run_id: str) -> None:
    cli_refuses(user.backprop("runs", "save", run_id, str(user.work / "saved")))


def chat_command(user: User, run_id: str) -> None:
    cli_refuses(user.backprop("chat", run_id, "hello"))  # exports into <home>/exports first


def sdk_export(user: User, run_id: str) -> None:
    settings = Settings(endpoint=user.stack.address, home=user.client_home)
    trainer = Trainer(settings=settings, progress=False)
    with pytest.raises(PathOutsideDirectoryError) as refused:
        trainer.export(run_id=run_id, output_dir=user.work / "out")
    assert refused.value.code == "INPUT_PATH_OUTSIDE_DIRECTORY"


CLIENT_PATHS: dict[str, Callable[[User, str], None]] = {
    "backprop export --output-dir": export_command,
    "backprop runs save": runs_save_command,
    "backprop chat RUN": chat_command,
    "Trainer.export": sdk_export,
}


@pytest.mark.parametrize("hostile", ["dotdot", "absolute"])
@pytest.mark.parametrize("client_path", CLIENT_PATHS)
def test_an_export_file_named_outside_its_directory_is_refused_and_nothing_is_written(
    stack: HostileStack, tmp_path: Path, client_path: str, hostile: str
) -> None:
    user = User(tmp_path / "user", stack)
    bashrc = user.root / "home" / ".bashrc"
    bashrc.parent.mkdir(parents=True)
    bashrc.write_bytes(USERS_OWN)
    # Both reach the user's .bashrc from each client path's directory (out/, the hidden
    # staging directory of `runs save`, <home>/exports): two levels down from home.
    name = "../../.bashrc" if hostile == "dotdot" else str(bashrc)
    before = user.files()

    CLIENT_PATHS[client_path](user, stack.run_exported_as(name))

    assert user.files() == before  # .bashrc untouched, and not a byte anywhere else
