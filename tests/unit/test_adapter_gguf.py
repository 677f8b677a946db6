"""A peft LoRA adapter as a llama.cpp adapter GGUF, applied by llama.cpp to the base model's GGUF
and compared with the merged torch model, plus what the converter must refuse."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from lora_adapters import save_random_lora

from backpropagate_api.errors import ConversionError
from backpropagate_services.common.isolation import run_isolated
from backpropagate_services.export.adapter_gguf import convert_adapter_to_gguf, permute_for_rope
from backpropagate_services.export.llama_runtime import open_gguf
from backpropagate_services.export.reference import ScoredChat, reference_logits, scored_chats

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Strong enough that the base GGUF alone clearly misses the fine-tuned model (measured: 90.7%
# top-1 agreement, mean KL 0.014, 14 times the f16 gate), gentle enough to stay fluent (reply
# perplexity 9.07, the base's 9.10; the greedy answer to the capital of France flips to the
# near-tie that docs/export.md describes, as it does for 0.01 and 0.015).
LORA_B_STD = 0.02
# rsLoRA scales by alpha / sqrt(r) = 5.7 instead of alpha / r = 2: the same strength needs a
# smaller lora_B.
RSLORA_B_STD = 0.01
RSLORA_CHATS = 4  # 108 positions: enough to see a wrong scale, at less cost


def llama_cpp_logits(
    base_gguf: Path, runs: list[tuple[Path | None, list[ScoredChat]]]
) -> list[list[np.ndarray]]:
    """llama.cpp's logits at the scored positions of each run's chats, for the base GGUF with
    that run's adapter GGUF (None: the base alone). Runs isolated: a native crash must not take
    pytest down."""
    results = []
    for adapter, chats in runs:
        llm = open_gguf(
            base_gguf,
            n_ctx=max(len(chat.token_ids) for chat in chats),
            threads=1,
            lora_path=adapter,
            logits_all=True,
        )
        try:
            logits = []
            for chat in chats:
                llm.reset()
                llm.eval(chat.token_ids)
                logits.append(np.array(llm.scores[chat.scored_positions], dtype=np.float32))
        finally:
            llm.close()
        results.append(logits)
    return results


@dataclass(frozen=True)
class Agreement:
    """How llama.cpp's next-token distributions compare with torch's on the same positions."""

    positions: int
    top1: float
    mean_kl: float  # KL(torch || llama.cpp), nats


def agreement(reference: list[torch.Tensor], candidate: list[np.ndarray]) -> Agreement:
    import torch

    log_p = torch.log_softmax(torch.cat(reference).double(), dim=-1)
    log_q = torch.log_softmax(torch.from_numpy(np.concatenate(candidate)).double(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    top1 = (log_p.argmax(dim=-1) == log_q.argmax(dim=-1)).double().mean()
    return Agreement(len(log_p), float(top1), float(kl.mean()))


def merged_model(base_dir: Path, adapter_dir: Path) -> PreTrainedModel:
    """The adapter as peft applies it, loaded back from what was saved."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def gguf_fields(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


def gguf_tensors(path: Path, names: set[str] | None = None) -> dict[str, np.ndarray]:
    """Tensor data (all, or those in `names`) in numpy order (rows, columns): the reverse of
    ggml's {ne0, ne1}."""
    from gguf import GGUFReader

    tensors = GGUFReader(path).tensors
    return {t.name: np.array(t.data) for t in tensors if names is None or t.name in names}


def peft_tensors(adapter_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(adapter_dir / "adapter_model.safetensors")


# -- SmolLM2 (Llama architecture) in real llama.cpp ------------------------------------------


@dataclass(frozen=True)
class Adapter:
    directory: Path
    gguf: Path


def _smollm2_adapter(smollm2_dir: Path, work: Path, lora_b_std: float, **options: Any) -> Adapter:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    directory = save_random_lora(model, work / "adapter", lora_b_std, **options)
    return Adapter(directory, convert_adapter_to_gguf(directory, smollm2_dir, work / "lora.gguf"))


@pytest.fixture(scope="module")
def adapter(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Adapter:
    return _smollm2_adapter(smollm2_dir, tmp_path_factory.mktemp("lora"), LORA_B_STD)


@pytest.fixture(scope="module")
def rslora_adapter(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Adapter:
    return _smollm2_adapter(
        smollm2_dir, tmp_path_factory.mktemp("rslora"), RSLORA_B_STD, use_rslora=True
    )


@pytest.fixture(scope="module")
def measured(
    smollm2_dir: Path,
    smollm2_tokenizer,
    smollm2_f16_gguf: Path,
    adapter: Adapter,
    rslora_adapter: Adapter,
) -> dict[str, Agreement]:
    """Each llama.cpp setup against the merged torch model it should reproduce."""
    chats = scored_chats(smollm2_tokenizer)
    rslora_chats = chats[:RSLORA_CHATS]
    merged = reference_logits(merged_model(smollm2_dir, adapter.directory), chats)
    rs_merged = reference_logits(merged_model(smollm2_dir, rslora_adapter.directory), rslora_chats)
    with_adapter, base_alone, with_rslora = run_isolated(
        "test",
        llama_cpp_logits,
        smollm2_f16_gguf,
        [(adapter.gguf, chats), (None, chats), (rslora_adapter.gguf, rslora_chats)],
    )
    return {
        "adapter": agreement(merged, with_adapter),
        "base alone": agreement(merged, base_alone),
        "rslora": agreement(rs_merged, with_rslora),
    }


@pytest.mark.model
@pytest.mark.llama
def test_llama_cpp_with_the_adapter_gguf_predicts_like_the_merged_torch_model(measured):
    # The gate of an f16 export of the merged model (docs/export.md).
    with_adapter = measured["adapter"]

    assert with_adapter.positions >= 200
    assert with_adapter.top1 >= 0.99, with_adapter
    assert with_adapter.mean_kl <= 1e-3, with_adapter


@pytest.mark.model
@pytest.mark.llama
def test_the_base_gguf_without_the_adapter_clearly_misses_the_merged_model(measured):
    # Proof that the adapter is applied, not just that the base is close to the fine-tune.
    with_adapter, base_alone = measured["adapter"], measured["base alone"]

    assert base_alone.mean_kl > 5e-3, base_alone  # fails the f16 gate several times over
    assert base_alone.mean_kl > 100 * with_adapter.mean_kl
    assert base_alone.top1 <= with_adapter.top1 - 0.03, (base_alone, with_adapter)


@pytest.mark.model
@pytest.mark.llama
def test_an_rslora_adapter_gets_its_alpha_over_sqrt_r_scale_in_llama_cpp(rslora_adapter, measured):
    rslora = measured["rslora"]

    # llama.cpp scales by alpha / r: alpha * sqrt(r) / r is rsLoRA's alpha / sqrt(r).
    written_alpha = gguf_fields(rslora_adapter.gguf)["adapter.lora.alpha"]
    assert written_alpha == pytest.approx(16 * math.sqrt(8))
    assert rslora.top1 >= 0.99, rslora
    assert rslora.mean_kl <= 1e-3, rslora


@pytest.mark.model
def test_adapter_gguf_has_the_metadata_and_tensor_pairs_llama_cpp_reads(adapter):
    fields = gguf_fields(adapter.gguf)
    tensors = gguf_tensors(adapter.gguf)

    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 16.0
    # all-linear on 30 layers: q, k, v, o, gate, up, down; not lm_head (tied to the embeddings).
    assert len(tensors) == 30 * 7 * 2
    # numpy order: lora_a is (r, in) = ggml {in, r}; lora_b is (out, r) = ggml {r, out}.
    assert tensors["blk.0.attn_q.weight.lora_a"].shape == (8, 576)
    assert tensors["blk.0.attn_k.weight.lora_b"].shape == (192, 8)  # 3 key/value heads of 64
    assert tensors["blk.29.ffn_down.weight.lora_a"].shape == (8, 1536)
    assert tensors["blk.29.ffn_down.weight.lora_b"].dtype == np.float16


@pytest.mark.model
def test_lora_b_of_query_and_key_is_permuted_exactly_as_the_converter_permutes_the_base(
    adapter, smollm2_f16_gguf, smollm2_dir
):
    from safetensors import safe_open

    base = gguf_tensors(smollm2_f16_gguf, {"blk.0.attn_q.weight", "blk.0.attn_k.weight"})
    lora = gguf_tensors(adapter.gguf)
    peft = peft_tensors(adapter.directory)
    prefix = "base_model.model.model.layers.0.self_attn"

    for module, gguf_name, heads in (("q_proj", "attn_q", 9), ("k_proj", "attn_k", 3)):
        with safe_open(smollm2_dir / "model.safetensors", framework="numpy") as weights:
            hf_weight = weights.get_tensor(f"model.layers.0.self_attn.{module}.weight")
        # The same permutation as llama.cpp's converter applied to the base weight...
        np.testing.assert_array_equal(
            base[f"blk.0.{gguf_name}.weight"], permute_for_rope(hf_weight, heads).astype(np.float16)
        )
        # ...is applied to lora_B's rows, while lora_A stays as peft saved it.
        np.testing.assert_array_equal(
            lora[f"blk.0.{gguf_name}.weight.lora_b"],
            permute_for_rope(peft[f"{prefix}.{module}.lora_B.weight"], heads).astype(np.float16),
        )
        np.testing.assert_array_equal(
            lora[f"blk.0.{gguf_name}.weight.lora_a"],
            peft[f"{prefix}.{module}.lora_A.weight"].astype(np.float16),
        )
    np.testing.assert_array_equal(
        lora["blk.0.attn_v.weight.lora_b"],
        peft[f"{prefix}.v_proj.lora_B.weight"].astype(np.float16),
    )


def test_the_rope_permutation_interleaves_the_two_halves_of_each_head():
    rows = np.arange(8).reshape(8, 1)  # 2 heads of 4 dimensions: halves [0 1|2 3], [4 5|6 7]

    assert permute_for_rope(rows, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


# -- tiny real models: Qwen2, refusals --------------------------------------------------------


def tiny_model(architecture: str, out_dir: Path, **config: Any) -> PreTrainedModel:
    """A randomly initialised model of `architecture`, saved to `out_dir` (its config.json is
    all the converter reads of the base model)."""
    import torch
    import transformers

    sizes = {
        "Qwen2ForCausalLM": (
            transformers.Qwen2Config,
            {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
            },
        ),
        "GPT2LMHeadModel": (transformers.GPT2Config, {"n_embd": 32, "n_layer": 2, "n_head": 4}),
    }
    config_class, size = sizes[architecture]
    torch.manual_seed(0)
    model = getattr(transformers, architecture)(config_class(vocab_size=64, **size, **config))
    model.save_pretrained(out_dir)
    return model


def test_a_qwen2_adapter_is_written_for_qwen2_without_permutation_and_with_its_lm_head(tmp_path):
    base_dir = tmp_path / "base"
    model = tiny_model("Qwen2ForCausalLM", base_dir)  # untied: lm_head has its own weight
    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter_dir = save_random_lora(
        model, tmp_path / "adapter", LORA_B_STD, target_modules=[*linear, "lm_head"]
    )

    out = convert_adapter_to_gguf(adapter_dir, base_dir, tmp_path / "lora.gguf", "f32")

    lora, peft = gguf_tensors(out), peft_tensors(adapter_dir)
    assert gguf_fields(out)["general.architecture"] == "qwen2"
    assert len(lora) == (2 * 7 + 1) * 2
    assert lora["output.weight.lora_b"].shape == (64, 8)
    # Qwen2 runs NEOX-style RoPE on HF's own row order: lora_B is written as peft saved it.
    np.testing.assert_array_equal(
        lora["blk.1.attn_k.weight.lora_b"],
        peft["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"],
    )


REFUSED = {
    "dora": ({"use_dora": True}, {}, "use_dora"),
    "saved modules": ({"modules_to_save": ["lm_head"]}, {}, "modules_to_save"),
    "embedding lora": ({"target_modules": ["embed_tokens", "q_proj"]}, {}, "token embeddings"),
    "tied lm_head": (
        {"target_modules": ["q_proj", "lm_head"]},
        {"tie_word_embeddings": True},
        "shares with the token embeddings",
    ),
    "rslora of mixed ranks": (
        {"use_rslora": True, "rank_pattern": {"v_proj": 4}},
        {},
        "cannot be written as one llama.cpp alpha",
    ),
}


@pytest.mark.parametrize(("lora_options", "base_config", "reason"), REFUSED.values(), ids=REFUSED)
def test_an_adapter_llama_cpp_cannot_apply_is_refused_and_nothing_is_written(
    tmp_path, lora_options, base_config, reason
):
    base_dir = tmp_path / "base"
    model = tiny_model("Qwen2ForCausalLM", base_dir, **base_config)
    adapter_dir = save_random_lora(model, tmp_path / "adapter", LORA_B_STD, **lora_options)

    with pytest.raises(ConversionError) as caught:
        convert_adapter_to_gguf(adapter_dir, base_dir, tmp_path / "out" / "lora.gguf")

    assert caught.value.code == "RUNTIME_GGUF_CONVERSION_FAILED"
    assert reason in caught.value.message
    assert "merged" in caught.value.hint
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_adapter_for_an_unsupported_architecture_is_refused_with_the_supported_ones(tmp_path):
    base_dir = tmp_path / "base"
    model = tiny_model("GPT2LMHeadModel", base_dir)
    adapter_dir = save_random_lora(
        model, tmp_path / "adapter", LORA_B_STD, target_modules=["c_attn"]
    )

    with pytest.raises(ConversionError) as caught:
        convert_adapter_to_gguf(adapter_dir, base_dir, tmp_path / "lora.gguf")

    assert caught.value.code == "RUNTIME_GGUF_CONVERSION_FAILED"
    assert "GPT2LMHeadModel" in caught.value.message
    assert "LlamaForCausalLM" in caught.value.message
    assert not (tmp_path / "lora.gguf").exists()


def test_a_quantised_adapter_type_is_refused_with_f16_as_the_hint(tmp_path):
    base_dir = tmp_path / "base"
    adapter_dir = save_random_lora(
        tiny_model("Qwen2ForCausalLM", base_dir), tmp_path / "adapter", LORA_B_STD
    )

    with pytest.raises(ConversionError) as caught:
        convert_adapter_to_gguf(adapter_dir, base_dir, tmp_path / "lora.gguf", "q8_0")

    assert "q8_0" in caught.value.message
    assert "f16" in caught.value.hint
    assert not (tmp_path / "lora.gguf").exists()
