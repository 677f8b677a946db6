"""A training run's peak memory, predicted from the model's config before any weight is loaded.

peak = overhead + weights + trainable state + activations of the largest micro-batch, less the
gradients or the activations, whichever is smaller (the backward pass makes the one as it frees
the other); on the CPU the peak of loading a checkpoint into another dtype may be the larger.

Where each number comes from (B: bytes of the compute dtype, 4 for fp32, 2 for bf16):
- weights: every parameter in the compute dtype (`load_model`); qlora's linear layers in NF4
  with double quantisation, 4.127 bits a weight (Dettmers et al., 2023), and the rest in the
  compute dtype (`apply_adapter` does not upcast them), plus bitsandbytes' compute-dtype copy of
  the largest 4-bit weight, dequantised for its product while it runs.
- trainable state: LoRA's A and B (r x in, out x r per targeted linear layer; DoRA adds one
  magnitude per output) are fp32 whatever the base (peft's `autocast_adapter_dtype`), each with a
  gradient and AdamW's two moments: 16 bytes a parameter. A full fine-tune trains the weights
  themselves: their gradient and two moments in their own dtype, 3B a parameter.
- activations: what autograd saves for the backward pass, per token of the micro-batch (padded
  to its longest row) and per decoder layer of a Llama-style model (SmolLM2, Llama, Qwen2,
  Mistral), counted with `torch.autograd.graph.saved_tensors_hooks` on SmolLM2:
  the two RMSNorms' fp32 input and 1/rms, 2(h + 1) x 4; SDPA's q, k, v, output and fp32
  log-sum-exp, (2 q_dim + 2 kv_dim) B + 4 heads; the gated MLP's gate, SiLU and up outputs, 3i B;
  for each LoRA layer lora_A's fp32 input (the dropped-out copy, or the input itself without
  dropout), in x 4, dropout's boolean mask, in x 1, and lora_A's output, r x 4. Layers that read
  one tensor (q/k/v, gate/up) share the input and the mask where the base computes in fp32, as
  the adapters do (`lora_dropout`); on a bf16 base each casts its own copy. A frozen linear
  layer saves nothing but its weight. DoRA also keeps the
  base and LoRA outputs, out x (B + 4); a full fine-tune the inputs of every linear layer and
  the normalised RMSNorm outputs, (4h + q_dim + i) B. Plus SDPA's boolean padding mask,
  rows x T x T bytes.
- gradient checkpointing (a run's memory plan turns it on where nothing fits without it): each
  decoder layer keeps only its input, h B per token, and recomputes the rest in the backward
  pass, one layer at a time: every layer's input plus one layer's activations as counted above.
- logits: projected at trained positions only (`logits_to_keep`); at the start of the backward
  pass the logits, cross-entropy's fp32 log-probabilities and both their gradients are alive:
  16 bytes x vocabulary per trained position, whatever the compute dtype.
- loading peak (CPU): converting a checkpoint to the compute dtype reads its file through a
  memory map whose pages count in the RSS beside the converted copy: overhead + weights +
  checkpoint bytes, 1201 MiB measured for SmolLM2's fp32 copy loaded in bf16 (440 + 257 + 513
  predicted). Loaded in its own dtype the weights are the mapped file, with no copy.
- CPU_ALLOCATOR_SLACK: on the CPU, glibc's malloc keeps the pages of the forward pass's
  temporaries, freed between saved tensors, so the process grows by more than what is saved,
  and by more again after a few steps (most with gradient accumulation: several passes a step).
  Measured on SmolLM2, 12 runs of 2 to 6 steps (micro-batches of 1 to 4 rows of 128 to 1024
  tokens, accumulation 1 to 4, fp32 and bf16): with 1.6 every predicted peak is within 14% of
  the measured one (-14% to +7%).
- overhead: the process itself. CPU: the RSS of a trainer process once `load_model` returned,
  less its weights: 433 to 447 MiB measured (Python 3.11, torch 2.13 CPU, transformers 5.23,
  peft 0.21: importing them ~380 MiB, the tokenizer and loading machinery ~60 MiB). CUDA: the
  CUDA context and the cuBLAS workspace outside torch's allocator, about 0.5 GiB on current
  GPUs with lazy module loading. No slack: the caching allocator's fragmentation is left to the
  margin the memory plan keeps (`memory_plan`).

CUDA was not measured here (no GPU was at hand): the CUDA terms are checked against published
peak-VRAM figures of LoRA and QLoRA runs of 7B, 8B and 70B models instead, each within 25%
(tests/unit/test_memory_estimate_published.py cites them). The preference methods are estimated
as trl runs them (chosen and rejected rows together, logits at every position, a full
fine-tune's frozen reference copy for dpo and kto). Not counted: a first run's one-off
dequantisation of a GGUF, the eval pass (no gradients: smaller than a step), an eager-attention
model's scores.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backpropagate_api.errors import DatasetEmptyError, ModelNotFoundError
from backpropagate_api.training import TrainingConfig
from backpropagate_services.common.datasets import PreferenceRow
from backpropagate_services.common.dtype_probe import MatmulShapes
from backpropagate_services.common.hardware import Hardware
from backpropagate_services.common.models import ModelSource, gguf_cache_directory
from backpropagate_services.trainer.adapters.lora import check_full_fine_tune_size
from backpropagate_services.trainer.adapters.targets import ALL_LINEAR, ALL_MLP, is_mlp_layer
from backpropagate_services.trainer.data.templating import (
    Conversation,
    SftRow,
    TokenizedExample,
    tokenize_conversations,
)
from backpropagate_services.trainer.planning.defaults import machine_accumulation

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

MIB = 1024**2

CPU_PROCESS_OVERHEAD = 440 * MIB
CUDA_CONTEXT_OVERHEAD = 512 * MIB
CPU_ALLOCATOR_SLACK = 1.6

ADAPTER_BYTES = 4  # peft keeps LoRA weights in fp32 on a bf16 base
ADAMW_MOMENTS = 2
LOGIT_COPIES_BYTES = 16  # logits + fp32 log-probs + both gradients, per vocabulary entry
NF4_BITS = 4.127  # NF4 with double-quantised block constants (QLoRA paper, section 3)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PAIRED_METHODS = ("dpo", "orpo", "simpo")  # chosen and rejected go through the model together


@dataclass(frozen=True)
class LinearLayer:
    name: str  # as in the model, e.g. "model.layers.0.self_attn.q_proj"
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model, read from its config alone."""

    parameters: int  # tied weights once
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    linear_layers: tuple[LinearLayer, ...]  # every linear layer but the output projection
    checkpoint_dtype: str  # what the weights on disk are: "float32", "bfloat16", ...

    @property
    def linear_parameters(self) -> int:
        return sum(layer.in_features * layer.out_features for layer in self.linear_layers)


@dataclass(frozen=True)
class MicroBatch:
    """The largest micro-batch a run takes: `rows` conversations padded to `length` tokens, of
    which `trained_positions` predict a trained token (the logits are computed there only)."""

    rows: int
    length: int
    trained_positions: int

    @classmethod
    def assumed(cls, rows: int, max_length: int) -> MicroBatch:
        """With no dataset: every row max_length long and trained throughout."""
        return cls(rows, max_length, rows * (max_length - 1))

    @classmethod
    def largest(cls, examples: Sequence[TokenizedExample], rows: int) -> MicroBatch:
        """The worst micro-batch of `rows` rows the run can draw: the longest row sets the
        padded length, the most-trained rows the logits (batches wrap around epochs, so a
        dataset smaller than a micro-batch repeats rows)."""
        trained = sorted((example.trained_tokens for example in examples), reverse=True)
        return cls(
            rows,
            max(len(example.input_ids) for example in examples),
            sum(trained[i % len(trained)] for i in range(rows)),
        )


@dataclass(frozen=True)
class MemoryParts:
    device: str
    weights_bytes: int
    trainable_bytes: int  # the trained weights (an adapter's), gradients, AdamW's moments
    gradients_bytes: int  # their share of trainable_bytes
    activations_bytes: int
    overhead_bytes: int
    loading_peak_bytes: int  # overhead + weights + the checkpoint's pages while converting
    available_bytes: int
    parameters: int
    trainable_parameters: int

    @property
    def total_bytes(self) -> int:
        """The larger of the loading and the training peak. Gradients are made as the backward
        pass frees the activations, so only the larger of the two counts in full (it matters
        for a full fine-tune: measured on SmolLM2, counting both was 18% over the peak)."""
        training = (
            self.overhead_bytes
            + self.weights_bytes
            + self.trainable_bytes
            + self.activations_bytes
            - min(self.gradients_bytes, self.activations_bytes)
        )
        return max(training, self.loading_peak_bytes)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.available_bytes


def config_location(source: ModelSource, cache_dir: Path) -> tuple[str, dict[str, Any]]:
    """Where `from_pretrained` finds this model's config and tokenizer without loading weights:
    a GGUF's dequantised copy once a run made it, else the GGUF's own metadata."""
    if source.kind != "gguf":
        return source.location, {}
    cached = gguf_cache_directory(source, cache_dir)
    if (cached / "config.json").is_file():
        return str(cached), {}
    gguf = Path(source.location)
    return str(gguf.parent), {"gguf_file": gguf.name}


def read_model_config(source: ModelSource, cache_dir: Path) -> PretrainedConfig:
    from transformers import AutoConfig

    location, extra = config_location(source, cache_dir)
    try:
        return AutoConfig.from_pretrained(location, **extra)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"Could not read the config of model {source.name!r} from {location}: {exc}",
            model=source.name,
        ) from exc


def read_tokenizer(source: ModelSource, cache_dir: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    location, extra = config_location(source, cache_dir)
    try:
        return AutoTokenizer.from_pretrained(location, **extra)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"Could not read the tokenizer of model {source.name!r} from {location}: {exc}",
            model=source.name,
        ) from exc


def matmul_shapes(source: ModelSource, cache_dir: Path) -> MatmulShapes:
    """The sizes that shape this model's training products, for the CPU's dtype probe."""
    config = read_model_config(source, cache_dir)
    return MatmulShapes(int(config.hidden_size), _intermediate_size(config), int(config.vocab_size))


def _intermediate_size(config: PretrainedConfig) -> int:
    return int(getattr(config, "intermediate_size", None) or 4 * int(config.hidden_size))


def model_shape(config: PretrainedConfig, *, from_gguf: bool = False) -> ModelShape:
    """The model's sizes, and its linear layers from a weightless copy built on the meta device
    (exact for any architecture, in a fraction of a second even for billions of parameters)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    output = model.get_output_embeddings()
    linear_layers = tuple(
        LinearLayer(name, *_features(module))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | Conv1D) and module is not output
    )
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return ModelShape(
        parameters=sum(parameter.numel() for parameter in model.parameters()),
        hidden_size=hidden,
        intermediate_size=_intermediate_size(config),
        num_layers=int(config.num_hidden_layers),
        num_heads=heads,
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        vocab_size=int(config.vocab_size),
        linear_layers=linear_layers,
        # A GGUF trains from its dequantised fp32 copy (`materialise_gguf`).
        checkpoint_dtype="float32" if from_gguf else _dtype_name(stored),
    )


def _features(module: Any) -> tuple[int, int]:
    if hasattr(module, "in_features"):
        return int(module.in_features), int(module.out_features)
    rows, columns = module.weight.shape  # Conv1D stores its weight as (in, out)
    return int(rows), int(columns)


def _dtype_name(dtype: object) -> str:
    name = str(dtype or "float32").removeprefix("torch.")
    return name if name in DTYPE_BYTES else "float32"


def targeted_layers(shape: ModelShape, target_modules: str | list[str]) -> list[LinearLayer]:
    """The linear layers LoRA wraps, by peft's rules: "all-linear" is every one but the output
    projection; "all-mlp" the feed-forward ones (`targets`); a list names modules by their last
    name parts; another string is a regex that must match a module's whole name."""
    if target_modules == ALL_LINEAR:
        return list(shape.linear_layers)
    if target_modules == ALL_MLP:
        return [layer for layer in shape.linear_layers if is_mlp_layer(layer.name)]
    if isinstance(target_modules, str):
        return [layer for layer in shape.linear_layers if re.fullmatch(target_modules, layer.name)]
    return [
        layer
        for layer in shape.linear_layers
        if any(layer.name == key or layer.name.endswith(f".{key}") for key in target_modules)
    ]


def trainable_parameters(shape: ModelShape, config: TrainingConfig) -> int:
    if config.adapter == "full":
        return shape.parameters
    dora = config.adapter == "dora"
    return sum(
        config.lora_r * (layer.in_features + layer.out_features)
        + (layer.out_features if dora else 0)
        for layer in targeted_layers(shape, config.target_modules)
    )


def estimate_memory(
    shape: ModelShape,
    config: TrainingConfig,
    hardware: Hardware,
    batch: MicroBatch,
    *,
    gradient_checkpointing: bool = False,
) -> MemoryParts:
    """The parts of a run's peak memory on `hardware` (see the module's docstring)."""
    cuda = hardware.is_cuda
    compute = "bfloat16" if config.adapter == "qlora" else hardware.compute_dtype
    size = DTYPE_BYTES[compute]
    full = config.adapter == "full"

    if config.adapter == "qlora":
        quantised = shape.linear_parameters
        largest = max(layer.in_features * layer.out_features for layer in shape.linear_layers)
        weights = (
            math.ceil(quantised * NF4_BITS / 8)
            + (shape.parameters - quantised) * size
            + largest * size  # dequantised for its product
        )
    else:
        weights = shape.parameters * size
    trainable = trainable_parameters(shape, config)
    trained_size = size if full else ADAPTER_BYTES
    gradients = trainable * trained_size
    moments = ADAMW_MOMENTS * trainable * trained_size
    adapter_weights = 0 if full else trainable * ADAPTER_BYTES  # full: they are `weights`

    rows = batch.rows * (2 if config.method in PAIRED_METHODS else 1)
    tokens = rows * batch.length
    saved = tokens * _saved_bytes_per_token(shape, config, size, gradient_checkpointing)
    slack = 1.0 if cuda else CPU_ALLOCATOR_SLACK
    # trl's preference losses take logits at every position, not only at the trained ones.
    positions = tokens if config.method != "sft" else batch.trained_positions
    logits = positions * shape.vocab_size * LOGIT_COPIES_BYTES
    padding_mask = rows * batch.length * batch.length  # SDPA's boolean mask, rows padded
    activations = round(saved * slack) + logits + padding_mask
    if full and config.method in ("dpo", "kto"):
        weights *= 2  # a frozen copy is the reference model

    overhead = CUDA_CONTEXT_OVERHEAD if cuda else CPU_PROCESS_OVERHEAD
    converted = not cuda and shape.checkpoint_dtype != compute
    checkpoint = shape.parameters * DTYPE_BYTES[shape.checkpoint_dtype] if converted else 0
    return MemoryParts(
        device=hardware.device,
        weights_bytes=weights,
        trainable_bytes=adapter_weights + gradients + moments,
        gradients_bytes=gradients,
        activations_bytes=activations,
        overhead_bytes=overhead,
        loading_peak_bytes=overhead + weights + checkpoint,
        available_bytes=hardware.free_memory,
        parameters=shape.parameters,
        trainable_parameters=trainable,
    )


def _saved_bytes_per_token(
    shape: ModelShape, config: TrainingConfig, size: int, checkpointed: bool
) -> int:
    """Bytes autograd keeps for the backward pass per token, over all decoder layers; with
    gradient checkpointing, every layer's input and the activations of the one recomputed."""
    h, i = shape.hidden_size, shape.intermediate_size
    q_dim = shape.num_heads * shape.head_dim
    kv_dim = shape.num_kv_heads * shape.head_dim
    per_layer = (
        2 * (h + 1) * 4  # RMSNorm: fp32 input and 1/rms
        + (2 * q_dim + 2 * kv_dim) * size
        + 4 * shape.num_heads  # SDPA: q, k, v, output, fp32 log-sum-exp
        + 3 * i * size  # gated MLP: gate, SiLU(gate), up
    )
    final_norm = (h + 1) * 4
    if config.adapter == "full":
        per_layer += (4 * h + q_dim + i) * size  # linear inputs, normalised RMSNorm outputs
    else:
        per_layer += math.ceil(_lora_saved_bytes(shape, config, size) / shape.num_layers)
    if checkpointed:
        return shape.num_layers * h * size + per_layer + final_norm
    return shape.num_layers * per_layer + final_norm


def _lora_saved_bytes(shape: ModelShape, config: TrainingConfig, size: int) -> int:
    """What the LoRA layers of every decoder layer save per token."""
    mask = 1 if config.lora_dropout > 0 else 0  # a boolean mask
    layers = targeted_layers(shape, config.target_modules)
    # Without a cast (fp32 base) layers reading one tensor share lora_A's input and the mask.
    inputs = {_input_of(layer) if size == ADAPTER_BYTES else layer.name: layer for layer in layers}
    lora = sum(layer.in_features * (ADAPTER_BYTES + mask) for layer in inputs.values())
    for layer in layers:
        lora += config.lora_r * ADAPTER_BYTES
        if config.adapter == "dora":
            lora += layer.out_features * (size + ADAPTER_BYTES)
    return lora


# Projections that read the same tensor in a Llama-style layer: attention's input, the MLP's.
SHARED_INPUTS = {
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "gate_proj": "mlp",
    "up_proj": "mlp",
}


def _input_of(layer: LinearLayer) -> str:
    """A name for the tensor `layer` reads: its own name unless it shares its input."""
    parent, _, last = layer.name.rpartition(".")
    block = parent.rpartition(".")[0]
    return f"{block}.{SHARED_INPUTS[last]}" if last in SHARED_INPUTS else layer.name


def micro_batch_rows(
    config: TrainingConfig, hardware: Hardware, *, accumulation_given: bool
) -> int:
    """Conversations per forward pass, settled as the worker settles them: from the given
    gradient_accumulation, else as many as this machine holds comfortably."""
    accumulation = (
        config.gradient_accumulation
        if accumulation_given
        else machine_accumulation(config, hardware)
    )
    return math.ceil(config.batch_size / accumulation)


def preference_conversations(rows: Sequence[PreferenceRow]) -> list[Conversation]:
    """Each answer of a preference row after its prompt: what goes through the model."""
    return [
        [*row["prompt"], *row[answer]]
        for row in rows
        for answer in ("chosen", "rejected", "completion")
        if answer in row
    ]


def estimate_run_memory(
    source: ModelSource,
    cache_dir: Path,
    config: TrainingConfig,
    hardware: Hardware,
    rows: int,
    conversations: Sequence[SftRow] | None = None,
) -> MemoryParts:
    """The estimate for a run on `source`: its config read (no weights), and the largest
    micro-batch of `rows` from `conversations` tokenised as training would (None: assume every
    row max_length tokens long)."""
    shape = source_shape(source, cache_dir)
    if config.adapter == "full":
        check_full_fine_tune_size(shape.parameters)
    largest = largest_micro_batches(source, cache_dir, config, conversations)
    return estimate_memory(shape, config, hardware, largest(rows))


def source_shape(source: ModelSource, cache_dir: Path) -> ModelShape:
    """The shape of the model `source` names, from its config alone."""
    return model_shape(read_model_config(source, cache_dir), from_gguf=source.kind == "gguf")


def largest_micro_batches(
    source: ModelSource,
    cache_dir: Path,
    config: TrainingConfig,
    conversations: Sequence[SftRow] | None,
) -> Callable[[int], MicroBatch]:
    """The largest micro-batch of a given number of rows: from `conversations` tokenised as
    training would, or (None) every row max_length tokens long."""
    if conversations is None:
        return lambda rows: MicroBatch.assumed(rows, config.max_length)
    tokenizer = read_tokenizer(source, cache_dir)
    examples = tokenize_conversations(conversations, tokenizer, config.max_length).examples
    if not examples:
        raise DatasetEmptyError(
            f"No conversation of the {len(conversations)} would train: none has an assistant "
            f"token within max_length={config.max_length}.",
            hint="Raise --max-length, or check that the rows have assistant turns.",
        )
    return lambda rows: MicroBatch.largest(examples, rows)
