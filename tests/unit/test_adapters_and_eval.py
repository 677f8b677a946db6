"""Every adapter kind learns on real SmolLM2; eval loss, best weights and early stopping."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from backpropagate_api.errors import (
    ConfigError,
    FullFineTuneTooLargeError,
    GpuNotAvailableError,
)
from backpropagate_api.settings import ExportSettings
from backpropagate_api.training import TrainingConfig
from backpropagate_services.common.hardware import cpu_dtype_choice
from backpropagate_services.common.models import load_model, resolve_model
from backpropagate_services.export.merge import merge_adapter
from backpropagate_services.export.pipeline import export_model
from backpropagate_services.export.reference import reference_logits
from backpropagate_services.trainer.adapters.lora import (
    check_adapter_supported,
    check_full_fine_tune_size,
)
from backpropagate_services.trainer.data.templating import IGNORE_INDEX, tokenize_conversations
from backpropagate_services.trainer.loop.sft import EvalReport, LoraTraining, TrainingHooks
from tests.unit.test_training_loop import FAST, MEMORISE, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def smollm2(smollm2_dir: Path):
    # In the dtype the trainer picks on this CPU, as a run would.
    return load_model(
        resolve_model(str(smollm2_dir)), smollm2_dir.parent, "cpu", cpu_dtype_choice().dtype
    )


@pytest.mark.model
@pytest.mark.parametrize(
    ("adapter", "learning_rate", "trains"),
    [
        ("lora", 1e-3, ".lora_"),
        ("dora", 1e-3, ".lora_magnitude_vector"),
        ("rslora", 1e-3, ".lora_"),
        ("full", 1e-4, "model.layers.0.mlp.down_proj.weight"),
    ],
    ids=["lora", "dora", "rslora", "full"],
)
def test_each_adapter_learns_a_memorisation_set_on_smollm2(
    smollm2_dir, adapter, learning_rate, trains
):
    model, tokenizer = smollm2(smollm2_dir)
    config = TrainingConfig(
        steps=6,
        adapter=adapter,
        learning_rate=learning_rate,
        lora_dropout=0.0,
        max_length=64,
    )
    training = LoraTraining(model, tokenizer, MEMORISE, config, eval_conversations=MEMORISE)
    before = training.eval_loss()

    trained_model, outcome = training.run()

    assert any(trains in name for name in training.trained_weights())
    # Memorised: the loss on the set itself at well under half the base model's.
    assert outcome.evals[0] == (0, pytest.approx(before))
    assert training.eval_loss() < before / 2, outcome.evals
    if adapter == "rslora":
        layer = trained_model.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.scaling["default"] == pytest.approx(config.lora_alpha / config.lora_r**0.5)
    if adapter == "full":
        assert all(parameter.requires_grad for parameter in trained_model.parameters())
    assert "Float8Linear" not in {type(module).__name__ for module in trained_model.modules()}


def test_fp8_compute_learns_with_every_linear_layer_in_fp8_but_the_head(smollm2_tokenizer):
    """What --fp8 runs on a Hopper GPU, here on torch's CPU FP8 kernels, on a tiny random
    Llama: on some CPUs those kernels take a slow path (0.05 GFLOP/s measured on a Xeon with
    AMX), where SmolLM2's 6 steps would take hours."""
    config = replace(FAST, fp8=True)
    model = tiny_llama(smollm2_tokenizer)
    training = LoraTraining(model, smollm2_tokenizer, MEMORISE, config, eval_conversations=MEMORISE)
    before = training.eval_loss()

    trained_model, _ = training.run()

    assert training.eval_loss() < before / 2
    layers = [type(module).__name__ for module in trained_model.modules()]
    assert layers.count("Float8Linear") == 2 * 7  # q, k, v, o, gate, up, down in both layers
    # The output head stays out: its logits feed the loss.
    assert type(trained_model.base_model.model.lm_head).__name__ == "Linear"


@pytest.mark.model
def test_completion_training_learns_documents_of_plain_text_on_smollm2(smollm2_dir):
    examples = Path(__file__).resolve().parents[2] / "examples"
    documents = (examples / "stories.txt").read_text().splitlines()[:6]
    model, tokenizer = smollm2(smollm2_dir)
    config = TrainingConfig(steps=12, learning_rate=1e-3, lora_dropout=0.0, max_length=64)
    training = LoraTraining(model, tokenizer, documents, config, eval_conversations=documents)
    before = training.eval_loss()

    training.run()

    # Every token of a document is trained, the first words as much as the last.
    assert training.dataset.examples[0].labels == training.dataset.examples[0].input_ids
    assert training.eval_loss() < before / 2


@pytest.mark.model
def test_a_full_fine_tune_exports_as_the_whole_model_with_nothing_to_merge(smollm2_dir, tmp_path):
    model, tokenizer = smollm2(smollm2_dir)
    config = TrainingConfig(steps=2, adapter="full", learning_rate=1e-4, max_length=64)
    trained, _ = LoraTraining(model, tokenizer, MEMORISE, config).run()
    trained.save_pretrained(tmp_path / "run")
    tokenizer.save_pretrained(tmp_path / "run")

    merged = merge_adapter(resolve_model(str(smollm2_dir)), tmp_path / "run", tmp_path, None)

    assert merged.merge_error == 0.0
    expected = reference_logits(trained, merged.chats)
    assert all(torch.equal(a, b) for a, b in zip(merged.logits, expected, strict=True))
    base, _ = smollm2(smollm2_dir)
    assert not torch.equal(reference_logits(base, merged.chats)[0], merged.logits[0])
    with pytest.raises(ConfigError, match="no adapter"):
        export_model(
            resolve_model(str(smollm2_dir)),
            tmp_path / "run",
            tmp_path / "build",
            export_format="adapter",
            quantization=None,
            prompt="",
            cache_dir=tmp_path,
            settings=ExportSettings(),
            on_stage=lambda *_: None,
        )


def test_qlora_and_fp8_without_a_capable_gpu_say_so_and_name_the_alternative():
    with pytest.raises(GpuNotAvailableError, match="CUDA") as qlora:
        check_adapter_supported(TrainingConfig(adapter="qlora"), cuda=False, fp8_capable=False)
    assert "--adapter lora" in qlora.value.hint
    with pytest.raises(GpuNotAvailableError, match="Hopper or Blackwell"):
        check_adapter_supported(TrainingConfig(fp8=True), cuda=True, fp8_capable=False)
    check_adapter_supported(TrainingConfig(adapter="qlora"), cuda=True, fp8_capable=False)
    with pytest.raises(ConfigError, match="one") as both:
        check_adapter_supported(
            TrainingConfig(adapter="qlora", fp8=True), cuda=True, fp8_capable=True
        )
    assert both.value.context["fields"] == "fp8,adapter"


def test_full_fine_tuning_is_refused_above_4b_parameters():
    check_full_fine_tune_size(4_000_000_000)
    with pytest.raises(FullFineTuneTooLargeError) as error:
        check_full_fine_tune_size(7_600_000_000)
    assert error.value.code == "RUNTIME_FULL_FT_MODEL_TOO_LARGE"
    assert "7.6B" in str(error.value) and "LoRA" in error.value.hint


def test_reasoning_traces_stay_in_the_assistant_target_as_text(smollm2_tokenizer):
    reply = "<think>\nThe user asks for 2 + 2; that is 4.\n</think>\nIt is 4."
    conversation = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": reply}]

    [example] = tokenize_conversations([conversation], smollm2_tokenizer, 256).examples

    labels = example.labels
    trained = [
        t for t, label in zip(example.input_ids, labels, strict=True) if label != IGNORE_INDEX
    ]
    assert smollm2_tokenizer.decode(trained).startswith(reply)


# The same questions with other answers: as the model memorises MEMORISE, its loss on these first
# falls (the answers' shape is learnt), then rises (the words are the wrong ones): it overfits.
CONTRADICTED = [
    [turn, {"role": "assistant", "content": reply["content"].replace(word, other)}]
    for (turn, reply), word, other in zip(
        MEMORISE,
        ["apple", "river", "stone", "cloud"],
        ["pear", "lake", "rock", "rain"],
        strict=True,
    )
]


OVERFIT_RATE = 3e-2  # the tiny model's eval loss on CONTRADICTED bottoms out within 30 steps


class EvalLog(TrainingHooks):
    def __init__(self) -> None:
        self.reports: list[EvalReport] = []

    def after_eval(self, report: EvalReport, training: LoraTraining) -> None:
        self.reports.append(report)


def test_eval_runs_every_eval_every_steps_and_the_run_keeps_the_best_weights(smollm2_tokenizer):
    config = TrainingConfig(steps=30, eval_every=5, learning_rate=OVERFIT_RATE, lora_dropout=0.0)
    training = LoraTraining(
        tiny_llama(smollm2_tokenizer),
        smollm2_tokenizer,
        MEMORISE,
        config,
        eval_conversations=CONTRADICTED,
    )
    hooks = EvalLog()

    _, outcome = training.run(hooks)

    assert [report.step for report in hooks.reports] == list(range(0, 31, 5))
    best_step, best_loss = min(outcome.evals[1:], key=lambda point: point[1])
    assert outcome.best_step == best_step < config.steps  # it overfit after that
    assert best_loss < outcome.evals[0][1]
    assert training.eval_loss() == pytest.approx(best_loss, rel=1e-5)


def test_early_stopping_ends_the_run_after_patience_evals_without_improvement(
    smollm2_tokenizer,
):
    config = TrainingConfig(
        steps=60,
        eval_every=5,
        early_stopping_patience=2,
        learning_rate=OVERFIT_RATE,
        lora_dropout=0.0,
    )
    training = LoraTraining(
        tiny_llama(smollm2_tokenizer),
        smollm2_tokenizer,
        MEMORISE,
        config,
        eval_conversations=CONTRADICTED,
    )

    _, outcome = training.run()

    assert outcome.stopped_early and outcome.steps_done < config.steps
    losses = dict(outcome.evals)
    assert outcome.steps_done - outcome.best_step == 2 * config.eval_every
    assert all(losses[step] >= losses[outcome.best_step] for step in losses if step)


def test_a_resumed_run_keeps_its_evals_and_best_weights(smollm2_tokenizer):
    config = TrainingConfig(steps=8, eval_every=2, learning_rate=FAST.learning_rate)

    def training(resume=None):
        return LoraTraining(
            tiny_llama(smollm2_tokenizer),
            smollm2_tokenizer,
            MEMORISE,
            config,
            eval_conversations=MEMORISE,
            resume=resume,
        )

    whole = training()
    _, uninterrupted = whole.run()

    class StopAfterFour(TrainingHooks):
        def before_step(self, step: int, run: LoraTraining) -> None:
            if step == 5:
                self.state = run.state()
                raise KeyboardInterrupt

    first, stop = training(), StopAfterFour()
    with pytest.raises(KeyboardInterrupt):
        first.run(stop)
    again = training(stop.state)
    _, resumed = again.run()

    assert resumed.evals == pytest.approx(uninterrupted.evals)
    assert resumed.best_step == uninterrupted.best_step
    for name, weight in whole.trained_weights().items():
        assert torch.allclose(again.trained_weights()[name], weight, atol=1e-6), name
