"""The CUDA memory estimate against published peak-VRAM measurements of LoRA and QLoRA runs.

No GPU here: each model is built from its published config alone on the meta device (the
configs are in tests/fixtures/model_configs), and the estimate for the run a source describes
must come within 25% of the peak it reports. The sources' "GB" are read as GiB, as nvidia-smi
and torch report them (an "80 GB" A100 holds 80 GiB).

Every run cited used bf16 and gradient checkpointing: LLaMA-Factory and ms-swift turn it on by
default, and the Hugging Face + FA2 runs reach lengths that only fit with it. Each trained on
every linear layer of the decoder ("all", "all-linear", "q, k, v, o, gate, up, down") and
computed the logits of every position, as `MicroBatch.assumed` counts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import AutoConfig

from backpropagate_api.training import TrainingConfig
from backpropagate_services.common.hardware import GIB, Hardware
from backpropagate_services.trainer.planning.memory_estimate import (
    MicroBatch,
    ModelShape,
    estimate_memory,
    model_shape,
)

MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "model_configs"
TOLERANCE = 0.25
GPU = Hardware("cuda:0", "a GPU", "bfloat16", 80 * GIB, 80 * GIB, 108, False)

# https://github.com/hiyouga/LLaMA-Factory/wiki/Performance-comparison
# LLaMA2-7B, 4-bit QLoRA, LoRA rank 8 on all modules, batch size 1, FlashAttention-2, one A100
# 40GB; VRAM by sequence length: 1,024: 6GB, 2,048: 7GB, 4,096: 9GB, 8,192: 12GB, 16,384: 19GB,
# 32,768: 32GB. And LLaMA2-7B, batch size 4, LoRA rank 8 on all modules, max length 1024:
# 16-bit LoRA "HF+FA2" 17GB, 4-bit "HF" 9GB (rows up to 1024 tokens: one of 1024 estimated).
# LLaMA-Factory's lora_dropout defaults to 0.
LLAMA_FACTORY = "LLaMA-Factory wiki, Performance comparison"
# https://unsloth.ai/docs/basics/unsloth-benchmarks (the same tables: the README of
# github.com/unslothai/unsloth, and https://unsloth.ai/blog/llama3-3), column "Hugging Face +
# FA2": Llama 3.1 (8B) Instruct, 4bit QLoRA on all linear layers (Q, K, V, O, gate, up and
# down), rank 32, batch size 1, sequences padded to the length given; the longest that fits the
# GPU: 12 GB: 932, 16 GB: 2,551, 24 GB: 5,789, 40 GB: 12,264, 48 GB: 15,502, 80 GB: 28,454.
# Llama 3.3 (70B) Instruct, the same setup on an 80GB A100: 6,916. At the longest length that
# fits, the run's peak is about the card's memory: the estimate falls furthest below it on the
# smallest cards (-24% at 12 GB, -3% at 80 GB), where the part that does not grow with the
# length is most of the run.
UNSLOTH = "Unsloth benchmarks, context length"
# https://github.com/modelscope/ms-swift README, Quick Start: "# 22GB" for `swift sft --model
# Qwen/Qwen2.5-7B-Instruct --train_type lora --torch_dtype bfloat16
# --per_device_train_batch_size 1 --lora_rank 8 --target_modules all-linear --max_length 2048`
# on alpaca-gpt4 and self-cognition rows; and examples/train/qlora/bnb.sh, "# 10GB" for the same
# run with --quant_method bnb --quant_bits 4 (nf4, double quantisation). Rows up to 2048 tokens:
# one of 2048 estimated. ms-swift's lora_dropout defaults to 0.05.
MS_SWIFT = "ms-swift README and examples/train/qlora/bnb.sh"


@dataclass(frozen=True)
class Published:
    source: str
    model: str  # as on the Hugging Face Hub: its directory under MODEL_CONFIGS
    adapter: str
    rank: int
    rows: int
    length: int
    peak_gib: float
    dropout: float = 0.0


MEASUREMENTS = [
    *(
        Published(LLAMA_FACTORY, "meta-llama/Llama-2-7b-hf", "qlora", 8, 1, length, peak)
        for length, peak in [(1024, 6), (2048, 7), (4096, 9), (8192, 12), (16384, 19), (32768, 32)]
    ),
    Published(LLAMA_FACTORY, "meta-llama/Llama-2-7b-hf", "lora", 8, 4, 1024, 17),
    Published(LLAMA_FACTORY, "meta-llama/Llama-2-7b-hf", "qlora", 8, 4, 1024, 9),
    *(
        Published(UNSLOTH, "meta-llama/Llama-3.1-8B-Instruct", "qlora", 32, 1, length, card)
        for card, length in [
            (12, 932),
            (16, 2551),
            (24, 5789),
            (40, 12264),
            (48, 15502),
            (80, 28454),
        ]
    ),
    Published(UNSLOTH, "meta-llama/Llama-3.3-70B-Instruct", "qlora", 32, 1, 6916, 80),
    Published(MS_SWIFT, "Qwen/Qwen2.5-7B-Instruct", "lora", 8, 1, 2048, 22, dropout=0.05),
    Published(MS_SWIFT, "Qwen/Qwen2.5-7B-Instruct", "qlora", 8, 1, 2048, 10, dropout=0.05),
]

_shapes: dict[str, ModelShape] = {}


def shape_of(model: str) -> ModelShape:
    """The model's shape from its config alone (meta device: no weights, no GPU)."""
    if model not in _shapes:
        _shapes[model] = model_shape(AutoConfig.from_pretrained(MODEL_CONFIGS / model))
    return _shapes[model]


@pytest.mark.parametrize(
    "published",
    MEASUREMENTS,
    ids=[
        f"{m.model.split('/')[1]}-{m.adapter}-r{m.rank}-{m.rows}x{m.length}" for m in MEASUREMENTS
    ],
)
def test_the_cuda_estimate_is_within_a_quarter_of_each_published_peak(published: Published):
    config = TrainingConfig(
        adapter=published.adapter,
        lora_r=published.rank,
        lora_dropout=published.dropout,
        target_modules="all-linear",
        max_length=published.length,
    )

    estimate = estimate_memory(
        shape_of(published.model),
        config,
        GPU,
        MicroBatch.assumed(published.rows, published.length),
        gradient_checkpointing=True,
    )

    ratio = estimate.total_bytes / (published.peak_gib * GIB)
    assert abs(ratio - 1) <= TOLERANCE, (published.source, f"{ratio:.2f}x the published peak")


def test_the_published_models_have_the_sizes_their_names_say():
    """The shipped configs are the models cited: parameter counts as the model cards give."""
    models = {measurement.model for measurement in MEASUREMENTS}
    billions = {model: shape_of(model).parameters / 1e9 for model in models}

    assert billions["meta-llama/Llama-2-7b-hf"] == pytest.approx(6.74, abs=0.01)
    assert billions["meta-llama/Llama-3.1-8B-Instruct"] == pytest.approx(8.03, abs=0.01)
    assert billions["meta-llama/Llama-3.3-70B-Instruct"] == pytest.approx(70.55, abs=0.01)
    assert billions["Qwen/Qwen2.5-7B-Instruct"] == pytest.approx(7.62, abs=0.01)
