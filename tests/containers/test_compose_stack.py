"""`docker compose up` for real: the shipped docker-compose.yml and Dockerfiles, built and run by
a container engine under the real Compose v2 binary, and used from the host as the README's
"The stack" section says.

One stack for the module, in the order a user meets it:
1. the images build (`make images`' two commands), each with only its service's dependencies,
   a non-root user and a health check;
2. `up --wait` brings every service to healthy;
3. from the host, `backprop` trains 3 steps on examples/quickstart.jsonl, exports an f16 GGUF
   (verified against torch) and chats with the downloaded file;
4. a trainer container that crashes mid-run comes back by its restart policy and resumes the
   run from its checkpoint: one record, every step once;
5. `down` then `up`: the runs, the export and its file are still there (the named volumes);
6. `down -v` leaves no container, network or volume of the project behind.

Only `minio` differs from the shipped file (compose.s3-standin.yml: moto's S3 server, since no
registry this project's CI reaches ships MinIO's). Where no registry is reachable at all, the
public base images are built locally from Debian packages (deploy/local-base/build.sh). Where no
container engine exists, the module is skipped and says why. Only loopback (the published ports)
and the project's own container network carry its traffic.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import servers
from compose_stack import Stack
from engine import Engine

from backpropagate.workflows import download_artifact, follow_run
from backpropagate_api.v1 import common_pb2, trainer_pb2
from backpropagate_services.stack import SERVICES

pytestmark = [pytest.mark.model, pytest.mark.llama, pytest.mark.containers]

MAIN_JOB_STEPS = 3
DRILL_STEPS = 10
DRILL_CHECKPOINT_EVERY = 2


def test_each_image_holds_only_its_services_dependencies_and_runs_as_a_non_root_user(
    stack: Stack,
) -> None:
    probe = (
        "import importlib.util as u, json, os; print(json.dumps({'uid': os.getuid(), **{m: "
        "u.find_spec(m) is not None for m in ('torch', 'llama_cpp', 'bitsandbytes')}}))"
    )
    found = {s: json.loads(python_in(stack.engine, s, probe)) for s in SERVICES}
    assert {s: f["uid"] for s, f in found.items()} == dict.fromkeys(SERVICES, 10001)
    assert [s for s, f in found.items() if f["torch"]] == ["trainer", "export"]
    assert [s for s, f in found.items() if f["llama_cpp"]] == ["export"]
    assert not any(f["bitsandbytes"] for f in found.values()), "QLoRA needs a GPU image"
    cuda = python_in(stack.engine, "trainer", "import torch; print(torch.version.cuda)")
    assert cuda.strip() == "None", "the CPU trainer image has torch's CPU build"
    for service in SERVICES:
        command = stack.engine.health_check(f"backpropagate-{service}:latest")
        assert command[-2:] == ["backpropagate_services.common.healthcheck", "127.0.0.1:50051"]


def python_in(engine: Engine, service: str, code: str) -> str:
    """Run `code` with the Python of the service's image, in a container of its own."""
    image = f"backpropagate-{service}:latest"
    return engine.run("run", "--rm", "--entrypoint", "python", image, "-c", code)


def test_up_brings_every_service_to_healthy(stack: Stack) -> None:
    seconds = stack.up()
    services = stack.services()
    assert set(services) == {"redis", "minio", *SERVICES}
    assert {name: row["Health"] for name, row in services.items()} == dict.fromkeys(
        services, "healthy"
    )
    print(f"up --wait: every service healthy after {seconds:.0f} s")


def test_main_job_from_the_host_trains_exports_a_verified_f16_gguf_and_chats(
    stack: Stack, quickstart: Path
) -> None:
    started = time.monotonic()
    stack.backprop("train", "--data", str(quickstart), "--steps", str(MAIN_JOB_STEPS))
    trained = time.monotonic()
    [run] = json.loads(stack.backprop("runs", "list", "--json"))["runs"]
    assert run["status"] == "JOB_STATUS_SUCCEEDED"
    assert len(run["loss_history"]) == MAIN_JOB_STEPS

    out = stack.client_dir / "out"
    exported = json.loads(
        stack.backprop(
            "export", run["run_id"], "--quantization", "f16", "--output-dir", str(out), "--json"
        )
    )
    export_seconds = time.monotonic() - trained
    assert exported["status"] == "JOB_STATUS_SUCCEEDED"
    assert exported["verification"]["passed"]
    gguf = out / exported["files"][0]["name"]
    assert gguf.read_bytes()[:4] == b"GGUF"
    assert gguf.stat().st_size == int(exported["size_bytes"])
    assert exported["smoke_answer"].strip()

    answer = stack.backprop("chat", str(gguf), "Name one colour of the sky.", "--max-tokens", "32")
    assert answer.strip()
    stack.shared.update(run_id=run["run_id"], export=exported)
    print(
        f"main job through the containers: train {trained - started:.0f} s, "
        f"export {export_seconds:.0f} s, chat {time.monotonic() - trained - export_seconds:.0f} s"
    )


def test_a_crashed_trainer_container_comes_back_and_resumes_its_run_from_the_checkpoint(
    stack: Stack, quickstart: Path
) -> None:
    run_id = stack.backprop(
        "train",
        "--data",
        str(quickstart),
        "--steps",
        str(DRILL_STEPS),
        "--batch-size",
        "2",
        "--max-length",
        "128",
        "--checkpoint-every",
        str(DRILL_CHECKPOINT_EVERY),
        "--detach",
    ).strip()
    connection = stack.sdk().connection

    def record() -> trainer_pb2.RunRecord:
        request = trainer_pb2.GetRunRequest(run_id=run_id)
        found: trainer_pb2.RunRecord = connection.call(
            "trainer", connection.trainer.GetRun, request
        )
        return found

    # A checkpoint first, never a time: the crash then finds the run mid-way on any machine
    # (8 steps remain after the first checkpoint).
    servers.wait_until(
        lambda: record().last_checkpoint_step >= DRILL_CHECKPOINT_EVERY,
        what="the run's first checkpoint",
        timeout=600,
        interval=0.5,
    )
    checkpointed = record()
    assert checkpointed.status == common_pb2.JOB_STATUS_RUNNING
    [trainer] = stack.compose("ps", "-q", "trainer").split()
    stack.engine.crash(trainer)

    servers.wait_until(
        lambda: (
            stack.engine.inspect(trainer)[0]["RestartCount"] >= 1
            and stack.services().get("trainer", {}).get("Health") == "healthy"
        ),
        what="the trainer container back and healthy",
        timeout=600,
        interval=2,
    )
    stack.backprop("runs", "watch", run_id)
    final = json.loads(stack.backprop("runs", "show", run_id, "--json"))
    events: list[trainer_pb2.RunEvent] = []
    follow_run(connection, run_id, events.append)  # the run's whole history

    assert final["status"] == "JOB_STATUS_SUCCEEDED"
    assert final["attempts"] == 2
    resumed = final["resumed_from_step"]
    assert resumed >= checkpointed.last_checkpoint_step and resumed % DRILL_CHECKPOINT_EVERY == 0
    assert len(final["loss_history"]) == DRILL_STEPS  # every step once
    assert final["loss_history"][: len(checkpointed.loss_history)] == pytest.approx(
        list(checkpointed.loss_history)
    )
    trained = [event for event in events if event.kind == "step" and event.loss > 0]
    steps = {a: [e.step for e in trained if e.attempt == a] for a in (1, 2)}
    assert steps[1] == list(range(1, len(steps[1]) + 1)) and steps[1][-1] >= resumed
    assert steps[2] == list(range(resumed + 1, DRILL_STEPS + 1))
    runs = json.loads(stack.backprop("runs", "list", "--json"))["runs"]
    assert [r["run_id"] for r in runs].count(run_id) == 1  # one record, however many attempts
    stack.shared["drill_run_id"] = run_id
    print(f"trainer crashed after step {steps[1][-1]}, resumed from step {resumed}")


def test_down_then_up_keeps_the_runs_the_export_and_its_file(stack: Stack) -> None:
    assert {"run_id", "export", "drill_run_id"} <= set(stack.shared), "the steps before failed"
    exported = stack.shared["export"]
    stack.compose("down", "--timeout", "60")
    assert stack.engine.project_containers(stack.project) == []
    seconds = stack.up()

    runs = json.loads(stack.backprop("runs", "list", "--json"))["runs"]
    assert {r["run_id"]: r["status"] for r in runs} == {
        stack.shared["run_id"]: "JOB_STATUS_SUCCEEDED",
        stack.shared["drill_run_id"]: "JOB_STATUS_SUCCEEDED",
    }
    export = json.loads(stack.backprop("exports", "show", exported["export_id"], "--json"))
    assert export["status"] == "JOB_STATUS_SUCCEEDED"
    assert export["run_id"] == stack.shared["run_id"]
    main_file = exported["files"][0]
    download_artifact(
        stack.sdk().connection,
        main_file["key"],
        stack.client_dir / "again" / main_file["name"],
        main_file["sha256"],  # the same bytes, or ExportVerificationError
    )
    print(f"up again after down: healthy after {seconds:.0f} s")


def test_down_with_volumes_leaves_no_container_network_or_volume(stack: Stack) -> None:
    stack.compose("down", "-v", "--remove-orphans", "--timeout", "60")
    assert stack.engine.project_leftovers(stack.project) == []
