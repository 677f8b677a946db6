"""A peft LoRA adapter as a llama.cpp LoRA GGUF, for Ollama's `ADAPTER` and llama.cpp's `--lora`.

The file is what llama.cpp's own `convert_lora_to_gguf.py` writes and `src/llama-adapter.cpp`
reads, written here with the `gguf` package rather than by importing those scripts:

- metadata: `general.architecture` is the base model's llama.cpp architecture (llama.cpp
  refuses an adapter whose architecture differs from the model's), `general.type` is
  "adapter", `adapter.type` is "lora" and `adapter.lora.alpha` is peft's `lora_alpha`;
- tensors: for every base tensor the adapter changes, say `blk.3.attn_q.weight`, a pair
  `blk.3.attn_q.weight.lora_a` and `.lora_b`. They are peft's `lora_A` (r x in) and `lora_B`
  (out x r) as they are: ggml lists dimensions in reverse, so llama.cpp sees A as {in, r} and
  B as {r, out} and computes `W x + scale * B (A x)`, with `scale = alpha / r` and r read from
  B's shape, per tensor. That is peft's `W + (lora_alpha / r) B A`.

The permutation. llama.cpp applies RoPE to pairs of adjacent dimensions of each head, HF Llama
to the two halves of each head. `convert_hf_to_gguf` therefore stores Llama's q_proj and k_proj
weights with their rows permuted: `W_gguf = P W`. The adapter must change the permuted weight:
`P (W + s B A) = P W + s (P B) A`, so lora_B's rows get the same permutation (per query head
for q_proj, per key/value head for k_proj) and lora_A stays as it is. Qwen2 keeps HF's layout
(llama.cpp runs it with NEOX-style RoPE): nothing is permuted.

What llama.cpp cannot apply is refused with ConversionError instead of being written as a file
that loads and then computes something else: DoRA, saved full modules (`modules_to_save`),
LoRA on the embeddings, trained biases, per-module alphas. Those adapters can still be exported
merged into the base model (`backprop export --format gguf`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backpropagate_api.errors import ConversionError
from backpropagate_services.common.atomic import staged

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

ADAPTER_OUTTYPES = ("f32", "f16", "bf16")
MERGED_EXPORT_HINT = (
    "Export the model with the adapter merged instead (backprop export --format gguf); "
    "it supports every adapter."
)


@dataclass(frozen=True)
class BaseArchitecture:
    """How llama.cpp's converter lays out one HF architecture's weights."""

    gguf_name: str  # general.architecture, as llama.cpp names it
    permutes_query_key: bool  # q_proj/k_proj rows reordered for llama.cpp's RoPE (see above)


SUPPORTED_ARCHITECTURES: dict[str, BaseArchitecture] = {
    "LlamaForCausalLM": BaseArchitecture("llama", permutes_query_key=True),
    "MistralForCausalLM": BaseArchitecture("llama", permutes_query_key=True),
    "Qwen2ForCausalLM": BaseArchitecture("qwen2", permutes_query_key=False),
}

# adapter_config.json options that change what the adapter computes beyond `W + s B A`.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA also rescales every weight column by a learned magnitude",
    "modules_to_save": "it carries full copies of whole modules",
    "trainable_token_indices": "it trains rows of the token embeddings",
    "lora_bias": "it trains a bias on lora_B",
    "use_qalora": "QA-LoRA pools the layer inputs before lora_A",
    "layer_replication": "it replicates layers of the base model",
    "target_parameters": "it adapts raw parameters (such as MoE experts), not linear layers",
    "alora_invocation_tokens": "an activated LoRA applies only after its invocation tokens",
}
_PEFT_TENSOR = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<side>A|B)\.weight$")


def _refuse(message: str, adapter_dir: Path, hint: str = MERGED_EXPORT_HINT) -> ConversionError:
    return ConversionError(message, hint=hint, adapter_dir=str(adapter_dir))


def _read_json(path: Path, adapter_dir: Path) -> dict[str, Any]:
    if not path.is_file():
        raise _refuse(
            f"{path} is missing.",
            adapter_dir,
            hint="Pass a peft adapter directory and the base model's HF directory.",
        )
    return dict(json.loads(path.read_text(encoding="utf-8")))


def _base_architecture(base_config: dict[str, Any], adapter_dir: Path) -> BaseArchitecture:
    names = base_config.get("architectures") or []
    architecture = next(
        (SUPPORTED_ARCHITECTURES[n] for n in names if n in SUPPORTED_ARCHITECTURES), None
    )
    if architecture is None:
        raise _refuse(
            f"LoRA adapters for {', '.join(names) or 'this architecture'} cannot be converted to "
            f"GGUF here; supported: {', '.join(SUPPORTED_ARCHITECTURES)}.",
            adapter_dir,
        )
    return architecture


def _check_lora_options(config: dict[str, Any], adapter_dir: Path) -> float:
    """Refuse what llama.cpp's `W + alpha / r * B A` cannot express; return peft's lora_alpha."""
    if config.get("peft_type", "LORA") != "LORA":
        raise _refuse(
            f"{adapter_dir} holds a {config['peft_type']} adapter, not LoRA.", adapter_dir
        )
    for option, why in _UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise _refuse(
                f"The adapter in {adapter_dir} uses {option}={config[option]!r}, which a llama.cpp "
                f"LoRA adapter cannot express: {why}.",
                adapter_dir,
            )
    if config.get("bias", "none") != "none":
        raise _refuse(
            f"The adapter in {adapter_dir} trains biases (bias={config['bias']!r}), which a "
            "llama.cpp LoRA adapter cannot carry.",
            adapter_dir,
        )
    alpha = float(config["lora_alpha"])
    if alpha == 0:
        # llama.cpp reads alpha 0 as "no alpha" and applies B A unscaled; peft scales it to 0.
        raise _refuse(
            f"The adapter in {adapter_dir} has lora_alpha=0: it changes nothing.",
            adapter_dir,
            hint="Train with a nonzero lora_alpha.",
        )
    if any(float(value) != alpha for value in (config.get("alpha_pattern") or {}).values()):
        raise _refuse(
            f"The adapter in {adapter_dir} sets per-module alphas (alpha_pattern); a llama.cpp "
            "adapter has one alpha.",
            adapter_dir,
        )
    return alpha


def _lora_pairs(adapter_dir: Path, vocab_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{peft module name: (lora_A, lora_B)} as float32 arrays (the adapter may be bf16)."""
    from safetensors.torch import load_file

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise _refuse(
            f"{weights} is missing.",
            adapter_dir,
            hint="Save the adapter with peft's save_pretrained (safetensors).",
        )
    tensors = load_file(weights)
    if embedding := next((key for key in tensors if ".lora_embedding_" in key), None):
        raise _refuse(
            f"The adapter in {adapter_dir} applies LoRA to the token embeddings ({embedding}), "
            "which this converter does not write.",
            adapter_dir,
        )
    sides: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in tensors.items():
        if key.endswith(".base_layer.weight"):
            # peft saves the frozen embedding or lm_head weight beside a LoRA on the output
            # layer, in case the vocabulary was resized. If it was not, the base GGUF has it.
            if tensor.shape[0] == vocab_size:
                continue
            raise _refuse(
                f"The adapter in {adapter_dir} holds {key} with {tensor.shape[0]} rows for a "
                f"base vocabulary of {vocab_size}: the vocabulary was resized, which a llama.cpp "
                "adapter cannot carry.",
                adapter_dir,
            )
        match = _PEFT_TENSOR.match(key)
        if match is None:
            raise _refuse(
                f"The adapter in {adapter_dir} holds {key}, which is not a LoRA "
                "lora_A or lora_B weight.",
                adapter_dir,
            )
        sides.setdefault(match["module"], {})[match["side"]] = tensor.float().numpy()
    pairs = {}
    for module, side in sides.items():
        if set(side) != {"A", "B"}:
            raise _refuse(
                f"The adapter in {adapter_dir} lacks lora_A or lora_B of {module}.",
                adapter_dir,
                hint="The adapter file is incomplete: save it again.",
            )
        lora_a, lora_b = side["A"], side["B"]
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] != lora_b.shape[1]:
            raise _refuse(
                f"lora_A {lora_a.shape} and lora_B {lora_b.shape} of {module} do not "
                "form a LoRA pair.",
                adapter_dir,
                hint="The adapter file is corrupt.",
            )
        pairs[module] = (lora_a, lora_b)
    if not pairs:
        raise _refuse(
            f"The adapter in {adapter_dir} has no LoRA weights.",
            adapter_dir,
            hint="The adapter file is empty: save it again.",
        )
    return pairs


def permute_for_rope(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a q_proj/k_proj weight (or of its lora_B) for llama.cpp's RoPE.

    Within each of the `n_head` heads, HF's row order is [first half, second half]; llama.cpp's
    is those halves interleaved. The same as `LlamaModel.permute` in llama.cpp's converter,
    for any number of columns (a weight's `in`, lora_B's rank).
    """
    head_half = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, 2, head_half, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def convert_adapter_to_gguf(
    adapter_dir: Path, base_hf_dir: Path, out_file: Path, outtype: str = "f16"
) -> Path:
    """Write `out_file`, a llama.cpp LoRA adapter, from a peft adapter directory.

    `base_hf_dir` is the base model's HF directory (only its config.json is read): the adapter
    must be applied to a GGUF converted from that model by llama.cpp's converter. Raises
    ConversionError, leaving nothing under `out_file`, for an architecture or an adapter
    llama.cpp cannot apply as it was trained.
    """
    import gguf

    if outtype not in ADAPTER_OUTTYPES:
        raise _refuse(
            f"A LoRA adapter GGUF is written as {', '.join(ADAPTER_OUTTYPES)}, not {outtype!r}.",
            adapter_dir,
            hint="Use f16: an adapter is a few MB, and quantising it would round the "
            "activations too (docs/export.md).",
        )
    base_config = _read_json(base_hf_dir / "config.json", adapter_dir)
    architecture = _base_architecture(base_config, adapter_dir)
    lora_config = _read_json(adapter_dir / "adapter_config.json", adapter_dir)
    alpha = _check_lora_options(lora_config, adapter_dir)
    pairs = _lora_pairs(adapter_dir, int(base_config["vocab_size"]))

    if lora_config.get("use_rslora"):
        ranks = {lora_b.shape[1] for _, lora_b in pairs.values()}
        # rsLoRA scales by alpha / sqrt(r), llama.cpp by alpha / r: writing alpha * sqrt(r) as
        # the alpha gives llama.cpp exactly rsLoRA's scale, as long as every module has that r.
        if len(ranks) != 1:
            raise _refuse(
                f"The rsLoRA adapter in {adapter_dir} has modules of ranks {sorted(ranks)}; its "
                "scales alpha / sqrt(r) cannot be written as one llama.cpp alpha.",
                adapter_dir,
            )
        alpha *= math.sqrt(ranks.pop())

    arch = next(
        key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture.gguf_name
    )
    tensor_names = gguf.get_tensor_name_map(arch, int(base_config["num_hidden_layers"]))
    n_head = int(base_config["num_attention_heads"])
    n_head_kv = int(base_config.get("num_key_value_heads") or n_head)
    head_count = {gguf.MODEL_TENSOR.ATTN_Q: n_head, gguf.MODEL_TENSOR.ATTN_K: n_head_kv}
    tied = bool(base_config.get("tie_word_embeddings", False))

    qtype = gguf.GGMLQuantizationType[outtype.upper()]
    writer = gguf.GGUFWriter(path=None, arch=architecture.gguf_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for module, (lora_a, lora_b) in pairs.items():
        mapped = tensor_names.get_type_and_name(f"{module}.weight", try_suffixes=(".weight",))
        if mapped is None:
            raise _refuse(
                f"The adapter changes {module}, which has no llama.cpp tensor.", adapter_dir
            )
        tensor_type, name = mapped
        if tensor_type == gguf.MODEL_TENSOR.OUTPUT and tied:
            # The GGUF has no output.weight: the output reuses token_embd.weight.
            raise _refuse(
                f"The adapter changes {module}, whose weight this base model shares with the "
                "token embeddings; llama.cpp cannot apply a LoRA to it.",
                adapter_dir,
            )
        if architecture.permutes_query_key and tensor_type in head_count:
            lora_b = permute_for_rope(lora_b, head_count[tensor_type])
        writer.add_tensor(f"{name}.lora_a", gguf.quants.quantize(lora_a, qtype), raw_dtype=qtype)
        writer.add_tensor(f"{name}.lora_b", gguf.quants.quantize(lora_b, qtype), raw_dtype=qtype)

    with staged(out_file) as partial:
        try:
            writer.write_header_to_file(path=partial)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    log.info(
        "wrote %s: %d LoRA tensor pairs for %s (%s, alpha %g)",
        out_file.name,
        len(pairs),
        architecture.gguf_name,
        outtype,
        alpha,
    )
    return out_file
