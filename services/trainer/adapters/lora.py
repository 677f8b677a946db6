"""What trains: LoRA and its variants applied with peft, or every weight (full fine-tuning).

LoRA (Hu et al., 2021) freezes the base weight W and learns a low-rank update:
h = W x + (lora_alpha / r) * lora_B(lora_A(dropout(x))), with lora_A (r x in) random and lora_B
(out x r) zero (dropout: one mask per input tensor, see `lora_dropout`), so training starts
from the base model exactly. Only lora_A and lora_B train: about 5 M parameters for SmolLM2-135M
at r=16 on every linear layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from backpropagate_api.errors import (
    ConfigError,
    FullFineTuneTooLargeError,
    GpuNotAvailableError,
    MissingDependencyError,
)
from backpropagate_api.training import TrainingConfig
from backpropagate_services.trainer.adapters.lora_dropout import share_lora_dropout
from backpropagate_services.trainer.adapters.targets import ALL_MLP, mlp_layers

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


FULL_FT_MAX_PARAMETERS = 4_000_000_000


def check_adapter_supported(config: TrainingConfig, *, cuda: bool, fp8_capable: bool) -> None:
    """Refuse, before any weights are loaded, what this machine cannot train."""
    if config.adapter == "qlora" and not cuda:
        raise GpuNotAvailableError(
            "QLoRA trains on a 4-bit NF4 base (bitsandbytes), which needs a CUDA GPU; "
            "this machine has none.",
            hint="Use --adapter lora (the same adapter on a full-precision base).",
            adapter="qlora",
        )
    if config.fp8 and config.adapter == "qlora":
        raise ConfigError(
            "FP8 compute and QLoRA's 4-bit base are two ways of storing the same weights; a "
            "run takes one.",
            hint="Use --adapter lora with --fp8, or --adapter qlora without it.",
            fields="fp8,adapter",
        )
    if config.fp8 and not fp8_capable:
        raise GpuNotAvailableError(
            "FP8 compute needs a Hopper or Blackwell GPU (compute capability 8.9 or newer); "
            + ("this GPU is older." if cuda else "this machine has no CUDA GPU."),
            hint="Leave out --fp8: training runs in bf16 or fp32 instead.",
            fp8=True,
        )


def check_full_fine_tune_size(parameters: int) -> None:
    """Full fine-tuning holds weights, gradients and two AdamW moments for every parameter:
    above 4B that is more than a workstation GPU holds, whatever the batch."""
    if parameters > FULL_FT_MAX_PARAMETERS:
        raise FullFineTuneTooLargeError(
            f"Full fine-tuning is limited to models of up to 4B parameters; this one has "
            f"{parameters / 1e9:.1f}B.",
            hint="Train a LoRA adapter instead (--adapter lora, or qlora on a CUDA GPU), or pick "
            "a model of 4B parameters or fewer.",
            parameters=parameters,
        )


def apply_adapter(model: PreTrainedModel, config: TrainingConfig) -> PreTrainedModel | PeftModel:
    """Make `model` trainable the way `config.adapter` says, in place.

    lora: lora_A / lora_B train. dora: the weight's magnitude too, its direction by LoRA
    (Liu et al., 2024). rslora: updates scaled by alpha / sqrt(r) instead of alpha / r, so a high
    rank keeps learning (Kalajdzievski, 2023). qlora: LoRA on a 4-bit base loaded by `load_model`,
    its other weights (embeddings, norms, output) left in the compute dtype: peft's
    `prepare_model_for_kbit_training` would upcast them to fp32, and with them every activation
    of the residual stream (2 GiB more weights alone for Qwen2.5-7B), for no gain in bf16.
    full: every weight trains; no adapter.
    """
    if config.fp8:
        use_fp8_compute(model)
    if config.adapter == "full":
        check_full_fine_tune_size(model.num_parameters())
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=peft_targets(model, config.target_modules),
        use_dora=config.adapter == "dora",
        use_rslora=config.adapter == "rslora",
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora_config)
    share_lora_dropout(peft_model)
    return peft_model  # type: ignore[return-value]


FP8_ALIGNMENT = 16  # FP8 matmuls take dimensions in multiples of 16


def use_fp8_compute(model: PreTrainedModel) -> None:
    """Compute every linear layer but the output head in FP8, in place (torchao's float8
    training: inputs, weights and gradients cast with dynamic per-tensor scales, the weights
    themselves kept in their own dtype, so a LoRA adapter or a full fine-tune saves as usual).
    The head stays: its logits feed the loss, where FP8's 3 mantissa bits cost accuracy."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as exc:
        raise MissingDependencyError(
            "FP8 training needs the torchao package where the trainer runs.",
            hint="pip install torchao (in the trainer image's gpu extra), or leave out --fp8.",
        ) from exc
    convert_to_float8_training(model, module_filter_fn=_fp8_convertible)


def _fp8_convertible(module: object, name: str) -> bool:
    sizes = (getattr(module, "in_features", 0), getattr(module, "out_features", 0))
    aligned = all(size > 0 and size % FP8_ALIGNMENT == 0 for size in sizes)
    return aligned and not name.endswith("lm_head")


def peft_targets(model: PreTrainedModel, target_modules: str | list[str]) -> str | list[str]:
    """`target_modules` as peft takes it: "all-mlp" becomes the whole names of the model's
    feed-forward linear layers (peft has no such shorthand); the rest as given."""
    if target_modules != ALL_MLP:
        return target_modules
    import torch
    from transformers.pytorch_utils import Conv1D

    linear = (torch.nn.Linear, Conv1D)  # GPT-2 keeps its linear layers in Conv1D
    layers = (name for name, module in model.named_modules() if isinstance(module, linear))
    found = mlp_layers(layers)
    if not found:
        raise ConfigError(
            f"target_modules {ALL_MLP} found no feed-forward layers in this model (none of its "
            "linear layers sits in a block named mlp, feed_forward or ffn).",
            hint="Use --target-modules all-linear, or name the modules (gate_proj,up_proj).",
            fields="target_modules",
        )
    return found
