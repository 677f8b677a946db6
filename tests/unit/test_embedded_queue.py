"""What the embedded queue adds to the contract: one SQLite file shared by the machine's real
processes, where a claim dies with the process that held it, and where the settings put it.

The contract tests (tests/contract/test_queue_contract.py) check the rest, against Redis too.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from backpropagate_api.errors import QueueCorruptError, QueueUnavailableError
from backpropagate_api.settings import QueueSettings, Settings
from backpropagate_services.common.queue import make_queue, sqlite_file
from backpropagate_services.common.queue.embedded import EmbeddedQueue
from backpropagate_services.common.queue.sqlite_file import MACHINE, holder_gone

# Only a dead holder's claim can be taken in these tests, never an expired one.
HOUR = 3600.0

# A worker process: claims the one job, says which, and holds it until its stdin closes.
HOLDER = """
import sys
from pathlib import Path
from backpropagate_services.common.queue.embedded import EmbeddedQueue

queue = EmbeddedQueue(visibility_timeout=3600.0, path=Path(sys.argv[1]))
job = queue.claim("train", "doomed-worker", timeout=10)
print(job.job_id if job else "", flush=True)
sys.stdin.read()
"""


def test_a_claim_whose_process_was_killed_is_taken_over_at_once(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    queue = EmbeddedQueue(visibility_timeout=HOUR, path=path)
    job_id = queue.enqueue("train", {"run_id": "run-1"})
    command = [sys.executable, "-c", HOLDER, str(path)]
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as holder:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == job_id
        assert queue.claim("train", "worker-2", timeout=0.3) is None  # its holder is alive

        holder.send_signal(signal.SIGKILL)
        holder.wait()  # reaped: a zombie still answers to its pid
    started = time.monotonic()
    job = queue.claim("train", "worker-2", timeout=5.0)

    assert time.monotonic() - started < 2.0
    assert job is not None
    assert (job.job_id, job.payload, job.deliveries) == (job_id, {"run_id": "run-1"}, 2)


def test_only_a_holder_on_this_machine_is_known_to_be_gone() -> None:
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()

    assert holder_gone(MACHINE, exited.pid)
    assert not holder_gone("another-host", exited.pid)
    assert not holder_gone(MACHINE, 1)  # init is running, whoever owns it


def test_asking_whether_a_holder_has_exited_sends_it_no_signal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On Windows `os.kill(pid, 0)` does not ask: it terminates the process. Here the module's
    `os.kill` records what Windows would kill, while the holder is alive and once it exited."""
    would_be_killed: list[int] = []
    windows_os = SimpleNamespace(kill=lambda pid, _signal: would_be_killed.append(pid))
    monkeypatch.setattr(sqlite_file, "os", windows_os)
    with subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    ) as holder:
        alive = holder_gone(MACHINE, holder.pid)
    exited = holder_gone(MACHINE, holder.pid)

    assert would_be_killed == []
    assert (alive, exited) == (False, True)


def test_in_memory_queues_are_private_to_their_object() -> None:
    first, second = EmbeddedQueue(visibility_timeout=HOUR), EmbeddedQueue(visibility_timeout=HOUR)
    first.enqueue("train", {"run_id": "run-1"})

    assert second.claim("train", "worker-1", timeout=0) is None


def test_the_embedded_queue_lives_in_home_unless_a_path_is_set(tmp_path: Path) -> None:
    make_queue(Settings(home=tmp_path / "home")).close()
    chosen = tmp_path / "elsewhere" / "jobs.sqlite3"
    make_queue(Settings(home=tmp_path / "home", queue=QueueSettings(embedded_path=chosen))).close()

    assert (tmp_path / "home" / "queue.sqlite3").is_file()
    assert chosen.is_file()


def test_a_queue_file_that_cannot_be_created_is_unavailable_naming_it(tmp_path: Path) -> None:
    (tmp_path / "not-a-directory").write_text("")
    path = tmp_path / "not-a-directory" / "queue.sqlite3"

    with pytest.raises(QueueUnavailableError, match="not-a-directory"):
        EmbeddedQueue(visibility_timeout=HOUR, path=path)


def not_a_database(path: Path) -> None:
    path.write_bytes(b"a file that was never a queue\n" * 200)


def pages_overwritten(path: Path) -> None:
    """A real queue file whose pages after the first were overwritten (a disk fault)."""
    queue = EmbeddedQueue(visibility_timeout=HOUR, path=path)
    for number in range(200):
        queue.enqueue("train", {"run_id": f"run-{number}", "padding": "x" * 100})
    queue.close()
    with path.open("r+b") as handle:
        handle.seek(4096)
        handle.write(b"\xff" * (path.stat().st_size - 4096))


@pytest.mark.parametrize("damage", [not_a_database, pages_overwritten])
def test_a_damaged_queue_file_is_corrupt_and_the_hint_says_which_file_to_move_aside(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    path = tmp_path / "queue.sqlite3"
    damage(path)

    with pytest.raises(QueueCorruptError) as corrupt:
        EmbeddedQueue(visibility_timeout=HOUR, path=path).claim("train", "worker-1", timeout=0)

    assert corrupt.value.code == "STATE_QUEUE_CORRUPT"
    assert str(path) in corrupt.value.message
    assert f"Move {path} aside" in corrupt.value.hint
    assert not corrupt.value.retryable
