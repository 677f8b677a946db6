"""Observability of a real run through the four services as processes (docs/observability.md).

Redis, S3 (moto) and an OTLP collector (tests/otlp_collector.py) run on loopback; each service
serves /metrics on a port of its own and logs JSON lines; the client is the `backprop` CLI in
processes of its own. A run of a tiny random Llama holds before its second step (the fault
drill's hold), so the metrics are read mid-run and again after it; then an export of it. One
trace must link the client, dataprep, the trainer's job across the queue and the export's
stages, every metric a dashboard panel queries must be one the services expose, and the log
lines must join the run's trace.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import servers
from otlp_collector import Collector, ReceivedSpan, otlp_collector
from prometheus_client.parser import text_string_to_metric_families
from service_processes import connected, in_process_stack, serve, stack_env
from tiny_models import save_tiny_llama
from transformers import AutoTokenizer

from backpropagate_api.settings import MetricsSettings, Settings
from backpropagate_api.v1 import safety_pb2
from backpropagate_services.common.models import OFFLINE_DEFAULT_ALIAS, hf_location, resolve_model
from backpropagate_services.stack import SERVICES

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "observability" / "grafana" / "dashboards" / "backpropagate.json"
STEPS = 3
HELD_BEFORE_STEP = 2
# The replayed safety reading: a GPU the metrics report whatever machine runs the test.
GPU_READING = {"index": 0, "name": "Drill GPU", "temperature_c": 41.0, "memory_used_mb": 1024.0}
HOST_READING = {"memory_used_mb": 4096.0, "memory_total_mb": 16384.0, "memory_percent": 25.0}


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


Scrape = list[Sample]


def scrape(port: int) -> Scrape:
    """The samples /metrics serves now, as Prometheus parses them."""
    with urllib.request.urlopen(f"http://{servers.LOOPBACK}:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return [
        Sample(sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def value(samples: Scrape, name: str, **labels: str) -> float | None:
    """The sum of the samples of `name` whose labels include `labels`; None when there is none."""
    matching = [
        sample.value
        for sample in samples
        if sample.name == name and labels.items() <= sample.labels.items()
    ]
    return sum(matching) if matching else None


def running_run_ids(samples: Scrape) -> set[str]:
    return {s.labels["run_id"] for s in samples if s.name == "backpropagate_run_step"}


@dataclass
class Stack:
    env: dict[str, str]  # a client's: every service's endpoint, the collector
    metrics_ports: dict[str, int]
    logs: dict[str, Path]
    release_file: Path
    collector: Collector
    tiny_model: Path

    def scrape(self, service: str) -> Scrape:
        return scrape(self.metrics_ports[service])

    def backprop(self, *args: str, log: Path) -> subprocess.Popen[bytes]:
        """The `backprop` CLI as the stack's client, in a process of its own."""
        backprop = str(Path(sys.executable).parent / "backprop")
        with log.open("wb") as out:
            return subprocess.Popen(
                [backprop, *args], stdout=out, stderr=subprocess.STDOUT, env=self.env
            )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(
        hf_location(resolve_model(OFFLINE_DEFAULT_ALIAS), model_cache)
    )
    return save_tiny_llama(tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def stack(
    redis_url: str, s3_endpoint: str, model_cache: Path, tiny_model: Path, tmp_path: Path
) -> Iterator[Stack]:
    addresses = {name: servers.free_address() for name in SERVICES}
    metrics_ports = {name: servers.free_port() for name in SERVICES}
    replay = tmp_path / "safety-readings.jsonl"
    replay.write_text(
        json.dumps({"host": HOST_READING, "gpus": [{**GPU_READING, "memory_total_mb": 8192.0}]})
    )
    release_file = tmp_path / "release-the-hold"
    with otlp_collector() as collector, ExitStack() as processes:
        env = stack_env(
            redis_url,
            s3_endpoint,
            model_cache,
            tmp_path / "home",
            **{f"ENDPOINTS__{name.upper()}": address for name, address in addresses.items()},
            SAFETY__SOURCE="replay",
            SAFETY__REPLAY_FILE=str(replay),
            SAFETY__INTERVAL_SECONDS="0.5",
            TRAINER__CPU_DTYPE="float32",
            TRAINER__THREADS="1",
            FAULT__HOLD_AT_STEP=str(HELD_BEFORE_STEP),
            FAULT__HOLD_RELEASE_FILE=str(release_file),
            LOG_JSON="true",
        )
        env |= {
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # spans reach the collector within a moment
        }
        logs = {name: tmp_path / f"{name}.log" for name in SERVICES}
        for name in SERVICES:
            service_env = {**env, "BACKPROPAGATE_METRICS__PORT": str(metrics_ports[name])}
            processes.enter_context(serve(name, addresses[name], service_env, logs[name]))
        yield Stack(env, metrics_ports, logs, release_file, collector, tiny_model)


def train_held_then_released(stack: Stack, tmp_path: Path) -> tuple[str, Scrape, Scrape]:
    """Train through `backprop train`; the trainer's metrics while the run is held before step
    2, and once it has ended; and the run's id."""
    train = stack.backprop(
        "train",
        "--model",
        str(stack.tiny_model),
        "--data",
        str(REPO / "examples" / "quickstart.jsonl"),
        "--steps",
        str(STEPS),
        "--batch-size",
        "2",
        "--max-length",
        "64",
        log=tmp_path / "train.log",
    )
    held: list[Scrape] = []

    def holding() -> bool:
        held[:] = [stack.scrape("trainer")]
        return bool(running_run_ids(held[0]))

    servers.wait_until(holding, what="the run held before step 2", timeout=180, process=train)
    [run_id] = running_run_ids(held[0])
    stack.release_file.touch()
    assert train.wait(timeout=180) == 0, (tmp_path / "train.log").read_text()[-3000:]
    return run_id, held[0], stack.scrape("trainer")


def export_through_the_cli(stack: Stack, run_id: str, tmp_path: Path) -> None:
    export = stack.backprop(
        "export",
        run_id,
        "--format",
        "hf",
        "--output-dir",
        str(tmp_path / "out"),
        log=tmp_path / "export.log",
    )
    assert export.wait(timeout=240) == 0, (tmp_path / "export.log").read_text()[-3000:]


def spans_of_the_run(collector: Collector, run_id: str) -> list[ReceivedSpan]:
    """Every span of the run's trace, once the export's last stage has arrived."""
    found: list[ReceivedSpan] = []

    def arrived() -> bool:
        spans = collector.spans()
        roots = [s for s in spans if s.name == "backprop train" and not s.parent_span_id]
        tagged = [s for s in roots if s.attributes.get("backpropagate.run_id") == run_id]
        if not tagged:
            return False
        trace = [s for s in spans if s.trace_id == tagged[0].trace_id]
        found[:] = trace
        return any(s.name == "export package" for s in trace)

    servers.wait_until(arrived, what="the run's spans at the collector", timeout=30)
    return found


def dashboard_metrics() -> set[str]:
    """The metric names every panel of the shipped Grafana dashboard queries."""
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert expressions, "the dashboard queries nothing"
    names = {
        name
        for expression in expressions
        for name in re.findall(r"\b(?:backpropagate|grpc_server)_[a-z0-9_]+", expression)
    }
    return names


def test_a_run_is_one_trace_its_metrics_move_and_its_log_lines_join_it(
    stack: Stack, tmp_path: Path
) -> None:
    run_id, held, ended = train_held_then_released(stack, tmp_path)
    export_through_the_cli(stack, run_id, tmp_path)
    scrapes = {name: stack.scrape(name) for name in SERVICES}

    # Mid-run: step 1 done, the job held, the queue's one job pending.
    assert value(held, "backpropagate_run_step", run_id=run_id) == 1
    assert value(held, "backpropagate_run_total_steps", run_id=run_id) == STEPS
    assert value(held, "backpropagate_train_steps_total") == 1
    tokens_held = value(held, "backpropagate_train_tokens_total")
    assert tokens_held is not None and tokens_held > 0
    assert value(held, "backpropagate_run_tokens_per_second", run_id=run_id) > 0  # type: ignore[operator]
    assert value(held, "backpropagate_run_peak_memory_bytes", run_id=run_id) > 0  # type: ignore[operator]
    assert value(held, "backpropagate_run_samples_seen", run_id=run_id) == 2
    assert value(held, "backpropagate_jobs_running", queue="train") == 1
    assert value(held, "backpropagate_queue_pending_jobs", queue="train") == 1
    assert value(held, "backpropagate_queue_waiting_jobs", queue="train") == 0

    # Ended: every step counted, the run's own series gone, the job done.
    assert value(ended, "backpropagate_train_steps_total") == STEPS
    assert value(ended, "backpropagate_train_tokens_total") > tokens_held  # type: ignore[operator]
    assert value(ended, "backpropagate_train_step_seconds_count") == STEPS
    assert running_run_ids(ended) == set()
    assert value(ended, "backpropagate_jobs_running", queue="train") == 0
    assert value(ended, "backpropagate_jobs_ended_total", queue="train", status="succeeded") == 1
    assert value(ended, "backpropagate_queue_pending_jobs", queue="train") == 0
    assert value(ended, "backpropagate_checkpoint_write_seconds_count") >= 1  # type: ignore[operator]
    assert value(ended, "backpropagate_checkpoint_size_bytes_sum") > 0  # type: ignore[operator]

    export = scrapes["export"]
    for stage in ("merge", "package"):
        count = value(export, "backpropagate_export_stage_seconds_count", format="hf", stage=stage)
        assert count == 1, stage
    assert value(export, "backpropagate_jobs_ended_total", queue="export", status="succeeded") == 1

    upload = {"grpc_method": "UploadDataset", "grpc_code": "OK"}
    assert value(scrapes["dataprep"], "grpc_server_handled_total", **upload) == 1
    submit = {"grpc_method": "SubmitTrain", "grpc_type": "unary"}
    assert value(scrapes["trainer"], "grpc_server_handling_seconds_count", **submit) == 1
    safety = scrapes["safety"]
    assert value(safety, "backpropagate_gpu_temperature_celsius", gpu="0") == 41.0
    assert value(safety, "backpropagate_gpu_memory_used_bytes", gpu="0") == 1024 * 2**20
    assert value(safety, "backpropagate_host_memory_total_bytes") == 16384 * 2**20
    assert value(safety, "backpropagate_safety_level") == 1  # safe

    # Every metric the dashboard shows is one the services expose.
    exposed = {sample.name for samples in [held, ended, *scrapes.values()] for sample in samples}
    exposed |= {name.removesuffix("_total") for name in exposed}  # a counter's family name
    exposed |= {re.sub(r"_(bucket|count|sum)$", "", name) for name in exposed}
    assert dashboard_metrics() - exposed == set()

    # One trace: the client's train, dataprep's upload, the trainer's job across the queue, the
    # client's export of the run and the export's stages.
    spans = spans_of_the_run(stack.collector, run_id)
    # A call has a client span and a server span of the same name: told apart by the process.
    span = {(s.service.removeprefix("backpropagate-"), s.name): s for s in spans}
    client_train = span["client", "backprop train"]
    upload = span["dataprep", "/backpropagate.v1.DataprepService/UploadDataset"]
    submit_train = span["trainer", "/backpropagate.v1.TrainerService/SubmitTrain"]
    train_job = span["trainer", "train job"]
    client_export = span["client", "backprop export"]
    submit_export = span["export", "/backpropagate.v1.ExportService/SubmitExport"]
    export_job = span["export", "export job"]

    def parent(child: ReceivedSpan) -> ReceivedSpan:
        [found] = [s for s in spans if s.span_id == child.parent_span_id]
        return found

    assert parent(parent(upload)) == client_train  # through the client's call span
    assert parent(parent(submit_train)) == client_train
    assert parent(train_job) == submit_train  # carried across the queue in the job's payload
    assert parent(client_export) == submit_train  # the run's trace, from its record
    assert parent(parent(submit_export)) == client_export
    assert parent(export_job) == submit_export
    for stage in ("merge", "package"):
        assert parent(span["export", f"export {stage}"]) == export_job
    for tagged in (client_train, submit_train, train_job, client_export, export_job):
        assert tagged.attributes["backpropagate.run_id"] == run_id, tagged.name

    # The trainer's log: JSON lines, those of the job carrying the run and its span.
    lines = [line for line in stack.logs["trainer"].read_text().splitlines() if line]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    of_the_run = [r for r in records if r["run_id"] == run_id]
    assert of_the_run
    assert {r["trace_id"] for r in of_the_run} == {train_job.trace_id}
    assert {r["span_id"] for r in of_the_run} >= {train_job.span_id}


def test_serve_all_serves_one_metrics_endpoint_for_the_four_services(tmp_path: Path) -> None:
    port = servers.free_port()
    settings = Settings(home=tmp_path, metrics=MetricsSettings(port=port))
    with (
        in_process_stack(settings, list(SERVICES)) as stack,
        connected(stack.address, ["safety"]) as client,
    ):
        client.call("safety", client.safety.Snapshot, safety_pb2.SnapshotRequest())
        samples = scrape(port)

    for queue in ("train", "export"):
        assert value(samples, "backpropagate_queue_waiting_jobs", queue=queue) == 0
        assert value(samples, "backpropagate_job_redeliveries_total", queue=queue) == 0
    snapshot = {"grpc_method": "Snapshot", "grpc_code": "OK"}
    assert value(samples, "grpc_server_handled_total", **snapshot) >= 1  # type: ignore[operator]
    assert value(samples, "backpropagate_host_memory_total_bytes") > 0  # type: ignore[operator]
    with pytest.raises(OSError):  # the endpoint goes with the stack
        scrape(port)
