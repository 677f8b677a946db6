"""The peak-memory estimate: its arithmetic against peft, its prediction against a real training
run's peak RSS, and `backprop estimate-vram --json` as a user runs it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from transformers import LlamaConfig, LlamaForCausalLM

from backpropagate import estimate_cli
from backpropagate.results import MemoryEstimateResult
from backpropagate_api.settings import Settings
from backpropagate_api.training import TrainingConfig
from backpropagate_services.common.hardware import Hardware, detect
from backpropagate_services.common.models import OFFLINE_DEFAULT_ALIAS, resolve_model
from backpropagate_services.trainer.adapters.lora import apply_adapter
from backpropagate_services.trainer.data.templating import TokenizedExample
from backpropagate_services.trainer.planning.memory_estimate import (
    MicroBatch,
    estimate_memory,
    estimate_run_memory,
    micro_batch_rows,
    model_shape,
    targeted_layers,
    trainable_parameters,
)

BACKPROP = str(Path(sys.executable).parent / "backprop")
QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.jsonl"
GIB = 1024**3
MODEL = OFFLINE_DEFAULT_ALIAS  # named: "auto" would pick the CUDA default on a GPU machine
# fp32, whatever the CPU: its kernels are the same on every x86 CPU, bf16's are not (AVX-512 BF16
# or AMX), and a bf16 run on another CPU peaked at 1.48x the estimate (see docs/training.md).
MEASURED_DTYPE = "float32"

TINY = LlamaConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
CPU = Hardware(
    device="cpu",
    name="test",
    compute_dtype="float32",
    total_memory=64 * GIB,
    free_memory=32 * GIB,
    cores=2,
    fp8=False,
)


def trainable_by_peft(config: TrainingConfig) -> int:
    """What the trainer itself makes trainable on a tiny random Llama."""
    model = apply_adapter(LlamaForCausalLM(TINY), config)
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


@pytest.mark.parametrize(
    "config",
    [
        TrainingConfig(lora_r=8),
        TrainingConfig(lora_r=4, target_modules=["q_proj", "v_proj"]),
        TrainingConfig(lora_r=16, target_modules=["gate_proj", "down_proj", "o_proj"]),
        TrainingConfig(lora_r=8, target_modules="all-mlp"),
        TrainingConfig(lora_r=8, adapter="dora"),
        TrainingConfig(lora_r=8, adapter="rslora"),
        TrainingConfig(adapter="full"),
    ],
    ids=["all-linear", "q-v", "mlp-and-o", "all-mlp", "dora", "rslora", "full"],
)
def test_trainable_parameter_count_from_the_config_equals_what_peft_trains(config):
    shape = model_shape(TINY)

    assert trainable_parameters(shape, config) == trainable_by_peft(config)


def test_all_linear_leaves_out_the_output_projection_and_counts_tied_weights_once():
    tied_config = LlamaConfig(**{**TINY.to_dict(), "tie_word_embeddings": True})
    tied = model_shape(tied_config)
    untied = model_shape(TINY)

    assert "lm_head" not in {layer.name for layer in targeted_layers(untied, "all-linear")}
    assert len(targeted_layers(untied, "all-linear")) == 7 * TINY.num_hidden_layers
    assert untied.parameters - tied.parameters == TINY.vocab_size * TINY.hidden_size
    assert tied.parameters == LlamaForCausalLM(tied_config).num_parameters()


def example(length: int, trained: int) -> TokenizedExample:
    labels = [-100] * (length - trained) + list(range(trained))
    return TokenizedExample(list(range(length)), labels)


def test_largest_micro_batch_pads_to_the_longest_row_and_wraps_a_small_dataset():
    examples = [example(10, 4), example(30, 5), example(20, 12)]

    assert MicroBatch.largest(examples, 2) == MicroBatch(rows=2, length=30, trained_positions=17)
    # Batches span epochs: four rows from three examples repeat the most-trained one.
    assert MicroBatch.largest(examples, 4).trained_positions == 12 + 5 + 4 + 12
    assert MicroBatch.assumed(4, 256) == MicroBatch(rows=4, length=256, trained_positions=1020)


def test_micro_batch_follows_the_given_accumulation_else_what_the_machine_holds():
    config = TrainingConfig(batch_size=8, gradient_accumulation=4)
    small_machine = replace(CPU, free_memory=3 * GIB, cores=1)  # default micro-batch: 1

    assert micro_batch_rows(config, CPU, accumulation_given=True) == 2
    assert micro_batch_rows(config, CPU, accumulation_given=False) == 4  # 8 GiB+, 2 cores: 4
    assert micro_batch_rows(config, small_machine, accumulation_given=False) == 1


def test_activations_grow_with_the_tokens_and_the_weights_with_the_dtype():
    shape = model_shape(TINY)
    config = TrainingConfig()
    small = estimate_memory(shape, config, CPU, MicroBatch.assumed(2, 128))
    double = estimate_memory(shape, config, CPU, MicroBatch.assumed(4, 128))
    bf16 = estimate_memory(
        shape, config, replace(CPU, compute_dtype="bfloat16"), MicroBatch.assumed(4, 128)
    )

    assert double.activations_bytes == pytest.approx(2 * small.activations_bytes, rel=0.01)
    assert double.weights_bytes == small.weights_bytes == 4 * shape.parameters
    assert bf16.weights_bytes == 2 * shape.parameters
    assert small.trainable_bytes == 16 * small.trainable_parameters  # fp32 + grad + 2 moments


def test_logits_are_counted_at_trained_positions_only():
    shape = model_shape(TINY)
    config = TrainingConfig()
    all_trained = estimate_memory(shape, config, CPU, MicroBatch(2, 128, 254))
    few_trained = estimate_memory(shape, config, CPU, MicroBatch(2, 128, 54))

    logits_per_position = 16 * TINY.vocab_size  # logits, log-probs and their two gradients
    difference = all_trained.activations_bytes - few_trained.activations_bytes
    assert difference == 200 * logits_per_position


def test_full_fine_tuning_keeps_more_state_than_lora_and_fits_compares_with_what_is_free():
    shape = model_shape(TINY)
    batch = MicroBatch.assumed(2, 128)
    lora = estimate_memory(shape, TrainingConfig(), CPU, batch)
    full = estimate_memory(shape, TrainingConfig(adapter="full"), CPU, batch)
    crowded = estimate_memory(shape, TrainingConfig(), replace(CPU, free_memory=1024), batch)

    # Gradients and two moments of every weight, against those of the adapter and its weights.
    assert full.trainable_bytes == 3 * full.weights_bytes > lora.trainable_bytes
    assert lora.fits and not crowded.fits
    # The gradients are made as the activations are freed: the smaller of the two is not added.
    assert lora.total_bytes == (
        lora.overhead_bytes
        + lora.weights_bytes
        + lora.trainable_bytes
        + lora.activations_bytes
        - lora.gradients_bytes
    )


def test_qlora_holds_linear_weights_in_4_bits_and_the_rest_in_bf16_on_a_gpu():
    shape = model_shape(TINY)
    gpu = replace(CPU, device="cuda:0", compute_dtype="bfloat16")
    qlora = estimate_memory(shape, TrainingConfig(adapter="qlora"), gpu, MicroBatch.assumed(2, 64))
    lora = estimate_memory(shape, TrainingConfig(), gpu, MicroBatch.assumed(2, 64))

    rest = shape.parameters - shape.linear_parameters  # embeddings, norms, lm_head
    dequantised = 2 * TINY.hidden_size * TINY.intermediate_size  # the largest, for its product
    nf4 = math.ceil(shape.linear_parameters * 4.127 / 8)
    assert qlora.weights_bytes == nf4 + 2 * rest + dequantised
    assert lora.weights_bytes == 2 * shape.parameters
    assert qlora.loading_peak_bytes < qlora.total_bytes  # the GPU holds no converted copy


def test_qlora_keeps_the_weights_it_does_not_quantise_in_the_compute_dtype_as_counted():
    """peft's prepare_model_for_kbit_training would upcast embeddings, norms and the output to
    fp32, and every activation of the residual stream with them."""
    model = LlamaForCausalLM(TINY).to(torch.bfloat16)

    trained = apply_adapter(model, TrainingConfig(adapter="qlora"))

    frozen = {name: p.dtype for name, p in trained.named_parameters() if not p.requires_grad}
    assert frozen and set(frozen.values()) == {torch.bfloat16}, frozen


def test_gradient_checkpointing_keeps_each_layer_input_and_one_layer_of_activations():
    shape = model_shape(TINY)
    gpu = replace(CPU, device="cuda:0", compute_dtype="bfloat16")
    batch = MicroBatch(2, 128, 0)  # no logits: the decoder layers' share alone

    kept = estimate_memory(shape, TrainingConfig(), gpu, batch).activations_bytes
    checkpointed = estimate_memory(
        shape, TrainingConfig(), gpu, batch, gradient_checkpointing=True
    ).activations_bytes

    padding_mask = 2 * 128 * 128
    per_layer = (kept - padding_mask - 256 * (TINY.hidden_size + 1) * 4) / TINY.num_hidden_layers
    inputs = 256 * TINY.num_hidden_layers * TINY.hidden_size * 2
    assert checkpointed == pytest.approx(kept - (TINY.num_hidden_layers - 1) * per_layer + inputs)


def test_the_table_shows_every_part_the_device_and_whether_it_fits(monkeypatch):
    console = Console(record=True, width=120)
    monkeypatch.setattr(estimate_cli, "console", console)
    estimate = MemoryEstimateResult(
        device="cpu",
        total_bytes=3 * GIB,
        weights_bytes=256 * 1024**2,
        trainable_bytes=75 * 1024**2,
        activations_bytes=2 * GIB,
        overhead_bytes=440 * 1024**2,
        available_bytes=GIB,
        fits=False,
        parameters=134_515_008,
        trainable_parameters=4_884_480,
    )

    estimate_cli.print_estimate(estimate)

    text = console.export_text()
    for shown in ("on cpu", "256 MiB", "2.00 GiB", "440 MiB", "3.00 GiB", "does not fit"):
        assert shown in text, shown


REPORT_OWN_PEAK = """
from backpropagate_services.common.hardware import peak_rss_bytes
print(peak_rss_bytes())
"""


def test_a_process_reports_its_own_peak_not_the_peak_of_the_process_that_started_it():
    """`ru_maxrss` survives exec: a worker started by a parent that once held 1 GB would report
    at least 1 GB, whatever it used itself."""
    parent = f"""
import subprocess, sys
held = bytearray(1 << 30)
for page in range(0, len(held), 4096):
    held[page] = 1  # resident, not only reserved
del held
print(subprocess.run([sys.executable, "-c", {REPORT_OWN_PEAK!r}], capture_output=True,
                     text=True, check=True).stdout)
"""
    done = subprocess.run(
        [sys.executable, "-c", parent], capture_output=True, text=True, check=True
    )
    child_peak = int(done.stdout.split()[0])
    assert 0 < child_peak < 512 * 2**20, child_peak


# The subprocess trains as a worker does (detect, load_model, LoraTraining) and reports its own
# peak RSS, so nothing this test process holds is counted. CUDA is hidden: on the CPU the peak is
# the process's RSS, which is what the estimate is checked against here.
TRAIN_AND_REPORT_PEAK = """
import json, sys
import torch
from backpropagate_services.common.hardware import detect, limit_malloc_arenas, peak_rss_bytes
from backpropagate_services.common.models import load_model, resolve_model
from backpropagate_api.settings import Settings
from backpropagate_services.trainer.loop.sft import LoraTraining
from backpropagate_api.training import TrainingConfig

limit_malloc_arenas()  # as a train worker does
config, data = TrainingConfig(**json.loads(sys.argv[1])), sys.argv[2]
conversations = [json.loads(line)["messages"] for line in open(data)]
settings = Settings()
hardware = detect(settings.trainer.cpu_dtype)
torch.set_num_threads(1)  # the other core belongs to whoever else is testing
model, tokenizer = load_model(
    resolve_model(sys.argv[3]), settings.model_cache_dir, hardware.device, hardware.compute_dtype
)
LoraTraining(model, tokenizer, conversations, config).run()
peak = peak_rss_bytes()
print(json.dumps({"peak": peak, "dtype": hardware.compute_dtype, "weights": str(model.dtype)}))
"""


def long_conversations(count: int, words: int) -> list[list[dict[str, str]]]:
    """Conversations whose answers run past any max_length used here: every row is full."""
    vocabulary = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "by", "it"]
    return [
        [
            {"role": "user", "content": f"Tell me story number {row}."},
            {
                "role": "assistant",
                "content": " ".join(vocabulary[(row + i) % len(vocabulary)] for i in range(words)),
            },
        ]
        for row in range(count)
    ]


def measured_peak_rss(config: dict[str, int], data: Path, model_dir: Path) -> dict[str, Any]:
    """Peak RSS of a run that loads the model from its HF directory: a GGUF to dequantise on
    the way (its cached copy missing or stale) would add a loading peak that is no training's."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            TRAIN_AND_REPORT_PEAK,
            json.dumps(config),
            str(data),
            str(model_dir),
        ],
        # Only what the run needs: nothing a test before this one left in the environment.
        env={
            "PATH": os.environ["PATH"],
            "HOME": os.environ.get("HOME", "/root"),
            "BACKPROPAGATE_HOME": os.environ["BACKPROPAGATE_HOME"],
            "BACKPROPAGATE_MODEL_CACHE": str(Settings().model_cache_dir),
            "CUDA_VISIBLE_DEVICES": "",
            "BACKPROPAGATE_TRAINER__CPU_DTYPE": MEASURED_DTYPE,
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.model
def test_estimate_is_within_a_quarter_of_a_real_runs_peak_rss_and_tracks_the_batch(
    tmp_path: Path, smollm2_dir: Path
) -> None:
    conversations = long_conversations(12, 600)
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"messages": row}) + "\n" for row in conversations))
    settings = Settings()
    # The run below trains on the CPU in fp32: estimate for that.
    hardware = replace(detect(), device="cpu", compute_dtype=MEASURED_DTYPE)
    source = resolve_model(str(smollm2_dir))

    results = {}
    for batch_size in (2, 4):
        config = {"steps": 3, "batch_size": batch_size, "max_length": 256}
        estimate = estimate_run_memory(
            source,
            settings.model_cache_dir,
            TrainingConfig(**config),
            hardware,
            rows=batch_size,  # gradient_accumulation 1: one micro-batch a step
            conversations=conversations,
        )
        measured = measured_peak_rss(config, data, smollm2_dir)
        assert measured["dtype"] == hardware.compute_dtype, measured
        results[batch_size] = (estimate.total_bytes, measured["peak"])

    for batch_size, (estimated, measured) in results.items():
        assert abs(estimated / measured - 1) <= 0.25, (batch_size, estimated, measured)
    (small_estimate, small_peak), (large_estimate, large_peak) = results[2], results[4]
    assert large_peak > 1.3 * small_peak
    assert large_estimate > 1.3 * small_estimate


def test_estimate_vram_prints_the_estimate_as_json_with_proto_field_names(tmp_path: Path):
    env = {**os.environ, "BACKPROPAGATE_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    done = subprocess.run(
        [BACKPROP, "estimate-vram", "--model", MODEL, "--data", str(QUICKSTART), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    estimate = json.loads(done.stdout)
    parts = ("weights_bytes", "trainable_bytes", "activations_bytes", "overhead_bytes")
    assert estimate["device"] in ("cpu", "cuda:0")
    assert set(estimate) == {
        "device",
        "total_bytes",
        *parts,
        "available_bytes",
        "fits",
        "parameters",
        "trainable_parameters",
        *(["plan"] if estimate["device"] == "cuda:0" else []),  # how a GPU run is fitted
    }
    assert int(estimate["parameters"]) == 134_515_008  # SmolLM2-135M, tied embeddings once
    # Every part counts, but the gradients only where they outgrow the activations.
    at_least = sum(int(estimate[part]) for part in parts) - int(estimate["trainable_bytes"])
    assert int(estimate["total_bytes"]) >= at_least
    assert estimate["fits"] == (int(estimate["total_bytes"]) <= int(estimate["available_bytes"]))
