"""A run fitted to its GPU before anything loads: on the cards users have, the CUDA default
(Qwen2.5-7B-Instruct, LoRA, batch 4, max_length 512) trains with what fits, or is refused with
what would.

No GPU here: the cards are `Hardware` values with their memory, and the model is built from its
published config on the meta device (tests/fixtures/model_configs).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from backpropagate.estimate_cli import print_estimate
from backpropagate.render import print_run
from backpropagate.results import MemoryEstimateResult, RunResult
from backpropagate_api.errors import GpuOutOfMemoryError
from backpropagate_api.layout import TRAIN_QUEUE, run_record_key
from backpropagate_api.settings import Settings, StoreSettings
from backpropagate_api.training import TrainingConfig
from backpropagate_api.v1 import common_pb2, trainer_pb2
from backpropagate_services.common.datasets import chat_rows, save_dataset
from backpropagate_services.common.hardware import GIB, Hardware
from backpropagate_services.common.models import ModelSource, resolve_model
from backpropagate_services.common.records import load_record, save_record
from backpropagate_services.common.runtime import Runtime
from backpropagate_services.trainer.planning.memory_estimate import MicroBatch, source_shape
from backpropagate_services.trainer.planning.memory_plan import (
    MemoryPlan,
    fit_again_if_moved,
    fit_to_gpu,
    micro_batch_sizes,
    plan_memory,
)
from backpropagate_services.trainer.runtime.safety_monitor import SafetyMonitor
from backpropagate_services.trainer.runtime.worker import TrainWorker

MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "model_configs"
QWEN_7B = ModelSource("hf_dir", str(MODEL_CONFIGS / "Qwen" / "Qwen2.5-7B-Instruct"), "Qwen2.5-7B")
CACHE = Path("/nonexistent")  # configs are read from the fixture directories, never a cache


def card(total_gib: float, free_gib: float) -> Hardware:
    return Hardware(
        device="cuda:0",
        name=f"a {total_gib:g} GB GPU",
        compute_dtype="bfloat16",
        total_memory=int(total_gib * GIB),
        free_memory=int(free_gib * GIB),
        cores=80,
        fp8=False,
    )


# What cards of these sizes report free with a desktop or nothing else on them.
CARD_12_GB = card(12, 11.5)
CARD_16_GB = card(16, 15.5)
CARD_24_GB = card(24, 23.5)
CARD_80_GB = card(80, 79)
CARD_8_GB = card(8, 7.6)
CPU = Hardware("cpu", "a CPU", "float32", 64 * GIB, 32 * GIB, 2, False)


@pytest.fixture(scope="module")
def qwen_7b():
    return source_shape(QWEN_7B, CACHE)


def planned(shape, hardware: Hardware, config: TrainingConfig | None = None, **given) -> MemoryPlan:
    config = config or TrainingConfig()
    return plan_memory(
        shape,
        config,
        hardware,
        lambda rows: MicroBatch.assumed(rows, config.max_length),
        adapter_given=given.get("adapter_given", False),
        accumulation_given=given.get("accumulation_given", False),
    )


def test_a_7b_model_on_a_16_gb_card_trains_qlora_one_conversation_a_pass_and_says_why(qwen_7b):
    plan = planned(qwen_7b, CARD_16_GB)

    assert (plan.adapter, plan.micro_batch, plan.gradient_accumulation) == ("qlora", 1, 4)
    assert not plan.gradient_checkpointing
    assert plan.adapter_chosen and plan.accumulation_chosen
    assert plan.estimate.total_bytes <= 0.9 * CARD_16_GB.free_memory
    assert plan.reason.startswith("QLoRA chosen: LoRA on the bfloat16 base needs at least")
    assert "micro-batch 1, 4 passes a step" in plan.reason


def test_a_24_gb_card_keeps_lora_on_the_bf16_base_with_a_smaller_micro_batch(qwen_7b):
    plan = planned(qwen_7b, CARD_24_GB)

    assert (plan.adapter, plan.micro_batch, plan.gradient_accumulation) == ("lora", 1, 4)
    assert "QLoRA" not in plan.reason


def test_an_80_gb_card_takes_the_whole_batch_in_one_pass(qwen_7b):
    plan = planned(qwen_7b, CARD_80_GB)

    assert (plan.adapter, plan.micro_batch, plan.gradient_accumulation) == ("lora", 4, 1)
    assert not plan.gradient_checkpointing


def test_a_12_gb_card_turns_on_gradient_checkpointing_rather_than_refusing(qwen_7b):
    plan = planned(qwen_7b, CARD_12_GB)

    assert (plan.adapter, plan.gradient_checkpointing) == ("qlora", True)
    assert "gradient checkpointing on" in plan.reason


def test_a_run_that_fits_no_setup_is_refused_with_its_estimate_and_what_would_fit(qwen_7b):
    with pytest.raises(GpuOutOfMemoryError) as refused:
        planned(qwen_7b, CARD_8_GB)

    error = refused.value
    assert error.code == "RUNTIME_GPU_OOM"
    assert error.grpc_status == "RESOURCE_EXHAUSTED"  # never INTERNAL
    assert "does not fit on a 8 GB GPU" in error.message
    assert "(qlora, micro-batch 1, gradient checkpointing) needs about" in error.message
    assert error.hint.startswith("These would fit: --max-length ")
    # What was suggested does fit.
    length = int(error.hint.split("--max-length ")[1].split()[0])
    shorter = planned(qwen_7b, CARD_8_GB, TrainingConfig(max_length=length))
    assert shorter.adapter == "qlora"


def test_a_named_adapter_is_kept_and_where_it_cannot_fit_qlora_is_offered(qwen_7b):
    named_qlora = planned(qwen_7b, CARD_80_GB, TrainingConfig(adapter="qlora"), adapter_given=True)
    assert (named_qlora.adapter, named_qlora.adapter_chosen) == ("qlora", False)

    with pytest.raises(GpuOutOfMemoryError) as refused:
        planned(qwen_7b, CARD_16_GB, TrainingConfig(adapter="lora"), adapter_given=True)

    assert "--adapter qlora (" in refused.value.hint


def test_a_named_gradient_accumulation_is_kept(qwen_7b):
    config = TrainingConfig(gradient_accumulation=2)
    plan = planned(qwen_7b, CARD_80_GB, config, accumulation_given=True)

    assert (plan.micro_batch, plan.gradient_accumulation, plan.accumulation_chosen) == (
        2,
        2,
        False,
    )


def test_a_named_accumulation_that_cannot_fit_is_refused_with_one_that_would(qwen_7b):
    config = TrainingConfig(adapter="lora", gradient_accumulation=1)  # 4 conversations a pass
    busy = card(24, 20.0)  # 18 GiB usable: one conversation a pass fits, four do not

    with pytest.raises(GpuOutOfMemoryError) as refused:
        planned(qwen_7b, busy, config, adapter_given=True, accumulation_given=True)

    assert "(lora, micro-batch 4, gradient checkpointing)" in refused.value.message
    assert refused.value.hint.startswith("These would fit: --gradient-accumulation 4 (")


@pytest.mark.parametrize("batch_size", [1, 4, 6, 16, 100])
def test_every_micro_batch_tried_keeps_the_effective_batch(batch_size):
    for micro_batch in micro_batch_sizes(batch_size):
        passes = math.ceil(batch_size / micro_batch)
        assert math.ceil(batch_size / passes) == micro_batch  # what the loop splits a step into
    assert micro_batch_sizes(batch_size)[0] == batch_size
    assert micro_batch_sizes(batch_size)[-1] == 1


def settled_default() -> trainer_pb2.TrainConfig:
    """The CUDA default as `defaults.settle` leaves it: no adapter or accumulation named."""
    return trainer_pb2.TrainConfig(base_model=QWEN_7B.location, steps=100)


def test_fitting_fills_in_the_config_and_records_the_plan_for_its_gpu():
    settled = settled_default()

    plan = fit_to_gpu(settled, QWEN_7B, CACHE, CARD_16_GB, rows=None)

    assert plan is not None
    assert (settled.adapter, settled.gradient_accumulation) == ("qlora", 4)
    record = plan.record()
    assert (record.device, record.device_name) == ("cuda:0", "a 16 GB GPU")
    assert record.device_total_bytes == CARD_16_GB.total_memory
    assert record.adapter_chosen and record.accumulation_chosen
    assert record.estimate_bytes == plan.estimate.total_bytes
    assert record.reason == plan.reason


def test_on_a_cpu_nothing_is_planned_and_the_config_is_left_as_it_was():
    settled = settled_default()

    assert fit_to_gpu(settled, QWEN_7B, CACHE, CPU, rows=None) is None
    assert settled == settled_default()


def planned_record(hardware: Hardware, config: trainer_pb2.TrainConfig) -> trainer_pb2.RunRecord:
    record = trainer_pb2.RunRecord(run_id="run-1", config=config)
    plan = fit_to_gpu(record.config, QWEN_7B, CACHE, hardware, rows=None)
    assert plan is not None
    record.memory_plan.CopyFrom(plan.record())
    return record


def test_a_worker_with_another_gpu_plans_again_and_one_with_the_same_gpu_keeps_the_plan():
    on_16 = planned_record(CARD_16_GB, settled_default())
    kept = trainer_pb2.RunRecord()
    kept.CopyFrom(on_16)

    fit_again_if_moved(kept, QWEN_7B, CACHE, card(16, 12.0), rows=None)  # same card, busier
    fit_again_if_moved(on_16, QWEN_7B, CACHE, CARD_80_GB, rows=None)

    assert (kept.config.adapter, kept.memory_plan.device_name) == ("qlora", "a 16 GB GPU")
    assert (on_16.config.adapter, on_16.config.gradient_accumulation) == ("lora", 1)
    assert on_16.memory_plan.device_total_bytes == CARD_80_GB.total_memory


def test_a_worker_without_a_gpu_sets_the_plan_aside_and_keeps_what_the_run_named():
    chosen = planned_record(CARD_16_GB, settled_default())
    named = planned_record(CARD_80_GB, trainer_pb2.TrainConfig(adapter="dora", steps=100))

    for record in (chosen, named):
        fit_again_if_moved(record, QWEN_7B, CACHE, CPU, rows=None)
        assert not record.HasField("memory_plan")
    assert (chosen.config.adapter, chosen.config.gradient_accumulation) == ("", 0)
    assert named.config.adapter == "dora"


def test_a_run_submitted_without_a_gpu_is_planned_by_a_worker_with_one():
    record = trainer_pb2.RunRecord(run_id="run-1", config=settled_default())

    fit_again_if_moved(record, QWEN_7B, CACHE, CARD_16_GB, rows=None)

    assert record.memory_plan.adapter_chosen and record.config.adapter == "qlora"


def test_a_run_going_on_from_a_checkpoint_keeps_its_plan():
    record = planned_record(CARD_16_GB, settled_default())
    record.last_checkpoint_step = 20

    fit_again_if_moved(record, QWEN_7B, CACHE, CARD_80_GB, rows=None)

    assert record.config.adapter == "qlora"
    assert record.memory_plan.device_total_bytes == CARD_16_GB.total_memory


def test_short_conversations_let_more_of_the_batch_into_one_pass(smollm2_dir: Path):
    """The largest micro-batch comes from the run's own rows, tokenised, not from max_length."""
    source = resolve_model(str(smollm2_dir))
    rows = [
        [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello!"}]
        for i in range(8)
    ]

    def settled() -> trainer_pb2.TrainConfig:
        return trainer_pb2.TrainConfig(steps=100, max_length=64)

    whole_batch = fit_to_gpu(settled(), source, CACHE, CARD_80_GB, rows)
    assert whole_batch is not None and whole_batch.micro_batch == 4
    # A card that holds these four short rows a pass, but not four of max_length tokens.
    tight = replace(CARD_80_GB, free_memory=math.ceil(whole_batch.estimate.total_bytes / 0.9) + 1)

    from_rows = fit_to_gpu(settled(), source, CACHE, tight, rows)
    from_max_length = fit_to_gpu(settled(), source, CACHE, tight, rows=None)

    assert from_rows is not None and from_max_length is not None
    assert (from_rows.micro_batch, from_rows.adapter) == (4, "lora")
    assert from_max_length.micro_batch < 4


@pytest.mark.model
def test_a_worker_without_a_gpu_trains_a_run_planned_for_one_as_its_cpu_allows(
    tmp_path: Path, smollm2_dir: Path
):
    """A stack's trainer service with a GPU chose QLoRA; the worker that took the run has only a
    CPU, where QLoRA cannot run: it plans again and trains LoRA instead of failing."""
    settings = Settings(home=tmp_path, store=StoreSettings(local_root=tmp_path / "store"))
    runtime = Runtime.from_settings(settings)
    conversations = [
        [{"role": "user", "content": f"Say hi to {name}."}, {"role": "assistant", "content": "Hi!"}]
        for name in ("Ada", "Alan", "Grace", "Linus")
    ]
    save_dataset(runtime.store, "data-1", "openai", chat_rows(conversations), "d.jsonl", 1)
    config = trainer_pb2.TrainConfig(
        base_model=str(smollm2_dir),
        steps=1,
        batch_size=2,
        max_length=64,
        adapter="qlora",
        gradient_accumulation=2,
    )
    record = trainer_pb2.RunRecord(
        run_id="run-1",
        status=common_pb2.JOB_STATUS_QUEUED,
        dataset_id="data-1",
        base_model=resolve_model(str(smollm2_dir)).spec,
        steps=1,
        config=config,
        memory_plan=trainer_pb2.MemoryPlan(
            device="cuda:0",
            device_name="NVIDIA GeForce RTX 4080",
            device_total_bytes=16 * GIB,
            adapter_chosen=True,
            accumulation_chosen=True,
            reason="QLoRA chosen: ...",
        ),
    )
    save_record(runtime.store, run_record_key("run-1"), record)
    runtime.queue.enqueue(TRAIN_QUEUE, {"run_id": "run-1"})

    TrainWorker(runtime, SafetyMonitor(None)).run_once()

    done = load_record(runtime.store, run_record_key("run-1"), trainer_pb2.RunRecord, "run")
    assert done.status == common_pb2.JOB_STATUS_SUCCEEDED, done.error.message
    assert (done.device, done.config.adapter) == ("cpu", "")
    assert not done.HasField("memory_plan")


def test_runs_show_and_estimate_vram_say_how_the_run_was_fitted(capsys):
    record = planned_record(CARD_16_GB, settled_default())
    record.run_id, record.status = "run-1", common_pb2.JOB_STATUS_QUEUED

    print_run(RunResult.from_proto(record))
    estimate = MemoryEstimateResult.from_proto(
        trainer_pb2.MemoryEstimate(device="cuda:0", plan=record.memory_plan)
    )
    print_estimate(estimate)

    shown = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "memory plan QLoRA chosen: LoRA on the bfloat16 base needs at least" in shown
    assert "fitted to the GPU: QLoRA chosen:" in shown
