"""Multi-run campaigns through the embedded default, on SmolLM2: one job with child runs, the
SLAO merge of their stored adapters, the timeline in the record and the events, a campaign that
continues an earlier one, the merged adapter learning both datasets and exporting to a GGUF, and
the refusals.

The CLI drill (a campaign killed in its second run, resumed to the same merged adapter) is in
tests/reliability/test_campaign_resume_drill.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from backpropagate import Trainer
from backpropagate_api.errors import ConfigError
from backpropagate_api.settings import Settings
from backpropagate_api.v1 import common_pb2, trainer_pb2
from backpropagate_services.trainer.adapters.factors import read_adapter_dir
from backpropagate_services.trainer.multirun.slao import Adapter

pytestmark = [pytest.mark.model]

STEPS = 12
# Two datasets of made-up facts, one a run: what each run learns is the other's to keep.
FACTS = {
    "first": [("the password of the blue door", "marmalade"), ("Zorblat's pet", "a heron")],
    "second": [("the capital of Quenthia", "Vellmoor"), ("Idris Tamm's job", "lighthouse keeper")],
}
RUN = {"steps_per_run": STEPS, "learning_rate": 1e-3, "batch_size": 4, "max_length": 64}


def write_facts(path: Path, facts: list[tuple[str, str]]) -> Path:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"{ask} {what}?"},
                {"role": "assistant", "content": f"{answer}."},
            ]
        }
        for what, answer in facts
        for ask in ("What is", "Tell me", "Do you know")
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def trainer(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    settings = Settings(home=tmp_path_factory.mktemp("campaign-home"), model_cache=model_cache)
    return Trainer(settings=settings, progress=False)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("facts")
    return [write_facts(root / f"{name}.jsonl", facts) for name, facts in FACTS.items()]


@pytest.fixture(scope="module")
def campaign(trainer: Trainer, datasets: list[Path]) -> trainer_pb2.RunRecord:
    result = trainer.multi_run(datasets, merge="slao", **RUN)
    return get_run(trainer, result.run_id)


def get_run(trainer: Trainer, run_id: str) -> trainer_pb2.RunRecord:
    connection = trainer.reader
    return connection.call(
        "trainer", connection.trainer.GetRun, trainer_pb2.GetRunRequest(run_id=run_id)
    )


def stored_adapter(trainer: Trainer, run_id: str) -> Adapter:
    """The adapter a run (or a campaign: its merged one) wrote to the local store."""
    return read_adapter_dir(trainer.settings.home / "artifacts" / "runs" / run_id / "adapter")


def test_a_campaign_is_one_job_whose_runs_train_on_one_dataset_each(trainer, campaign):
    assert campaign.status == common_pb2.JOB_STATUS_SUCCEEDED
    assert campaign.run_id.startswith("campaign-")
    assert campaign.campaign.config.runs == 2 and campaign.campaign.config.merge == "slao"
    assert campaign.steps == 2 * STEPS and len(campaign.loss_history) == 2 * STEPS
    children = [get_run(trainer, run_id) for run_id in campaign.campaign.run_ids]
    assert [child.campaign_run for child in children] == [1, 2]
    assert {child.campaign_id for child in children} == {campaign.run_id}
    assert [child.dataset_id for child in children] == list(campaign.campaign.dataset_ids)
    assert all(child.status == common_pb2.JOB_STATUS_SUCCEEDED for child in children)
    # Run 2 also replays a tenth of its 6 rows from run 1's (the default replay): 1 row.
    assert campaign.campaign.config.replay == pytest.approx(0.1)
    assert [child.examples_trained for child in children] == [6, 7]
    assert [child.config.seed for child in children] == [42, 43]
    timeline = campaign.campaign.timeline
    assert [(p.run, p.task, p.run_id) for p in timeline] == [
        (1, 1, children[0].run_id),
        (2, 2, children[1].run_id),
    ]
    assert [p.merge_weight for p in timeline] == pytest.approx([1, 1 / math.sqrt(2)])
    assert [p.loss for p in timeline] == [child.final_loss for child in children]
    assert all(p.change_norm > 0 for p in timeline)
    assert campaign.output == f"runs/{campaign.run_id}/adapter/"


def test_the_merged_adapter_is_slao_of_the_runs_stored_adapters(trainer, campaign):
    first, second = (stored_adapter(trainer, run_id) for run_id in campaign.campaign.run_ids)
    merged = stored_adapter(trainer, campaign.run_id)

    assert set(merged) == set(first) == set(second)
    for name, layer in merged.items():
        assert torch.equal(layer.a, second[name].a)  # A is replaced
        expected_b = first[name].b + (second[name].b - first[name].b) / math.sqrt(2)
        assert torch.allclose(layer.b, expected_b, atol=1e-7)


def test_the_merged_adapter_learnt_both_runs_data(trainer, campaign, datasets):
    """Its loss on each run's facts is well below the base model's: the second run did not
    wipe out the first."""
    from peft import PeftModel

    from backpropagate_services.common.models import load_model, resolve_model
    from backpropagate_services.trainer.data.templating import tokenize_conversations
    from backpropagate_services.trainer.loop.sft import collate, summed_token_loss

    model, tokenizer = load_model(
        resolve_model(campaign.base_model), trainer.settings.model_cache_dir, dtype="float32"
    )

    def loss(model, path: Path) -> float:
        rows = [json.loads(line)["messages"] for line in path.read_text().splitlines()]
        examples = tokenize_conversations(rows, tokenizer, 64).examples
        batch = collate(examples, tokenizer.pad_token_id or 0, torch.device("cpu"))
        with torch.no_grad():
            total = float(summed_token_loss(model, batch))
        return total / sum(example.trained_tokens for example in examples)

    base = [loss(model, path) for path in datasets]
    adapter_dir = trainer.settings.home / "artifacts" / "runs" / campaign.run_id / "adapter"
    merged_model = PeftModel.from_pretrained(model, str(adapter_dir))
    merged = [loss(merged_model, path) for path in datasets]
    print(f"loss base {base}, merged {merged}")
    assert all(after < 0.5 * before for before, after in zip(base, merged, strict=True))


@pytest.mark.llama
def test_the_merged_adapter_exports_to_a_verified_gguf_like_any_run(trainer, campaign, tmp_path):
    """`backprop export CAMPAIGN` merges the campaign's adapter into the base model, and the GGUF
    agrees with base + merged adapter in torch."""
    exported = trainer.export("gguf", run_id=campaign.run_id, output_dir=tmp_path)

    assert exported.run_id == campaign.run_id
    assert exported.path.parent == tmp_path and exported.path.read_bytes()[:4] == b"GGUF"
    assert exported.record["verification"]["passed"]
    assert exported.top1_agreement >= 0.99
    assert exported.merge_error < 1e-3  # the merged weights compute what base + adapter did
    assert exported.smoke_answer.strip()


def test_the_campaign_events_carry_the_runs_and_the_merges(trainer, campaign):
    connection = trainer.reader
    events = list(
        connection.stream(
            "trainer",
            connection.trainer.WatchRun,
            trainer_pb2.WatchRunRequest(run_id=campaign.run_id),
        )
    )
    merged = [event for event in events if event.kind == "merged"]
    assert [event.merge.run for event in merged] == [1, 2]
    assert [event.merge.merge_weight for event in merged] == pytest.approx([1, 1 / math.sqrt(2)])
    steps = [event for event in events if event.kind == "step"]
    assert [(event.campaign_run, event.step) for event in steps] == [
        (run, step) for run in (1, 2) for step in range(1, STEPS + 1)
    ]
    assert events[-1].run_id == campaign.run_id and events[-1].kind == "ended"


def test_a_campaign_goes_on_from_an_earlier_one(trainer, campaign, datasets):
    """The merge counts on: the third task weighs 1 / sqrt(3), and the run starts from the
    earlier campaign's last fine-tuned B on the QR of its A."""
    result = trainer.multi_run(
        datasets[0], runs=1, continue_from=campaign.run_id, merge="slao", **RUN
    )
    later = get_run(trainer, result.run_id)

    assert later.campaign.tasks_before == 2
    [point] = later.campaign.timeline
    assert (point.run, point.task) == (1, 3)
    assert point.merge_weight == pytest.approx(1 / math.sqrt(3))
    before = stored_adapter(trainer, campaign.run_id)
    third = stored_adapter(trainer, point.run_id)
    merged = stored_adapter(trainer, later.run_id)
    for name, layer in merged.items():
        expected_b = before[name].b + (third[name].b - before[name].b) / math.sqrt(3)
        assert torch.allclose(layer.b, expected_b, atol=1e-7)


def test_with_replay_later_runs_also_train_on_earlier_runs_rows(trainer, datasets):
    """Rehearsal: run 2 trains on its 6 rows and half as many of run 1's, and says so."""
    result = trainer.multi_run(datasets, replay=0.5, **{**RUN, "steps_per_run": 2})
    campaign = get_run(trainer, result.run_id)

    assert result.replay == 0.5 and campaign.campaign.config.replay == 0.5
    children = [get_run(trainer, run_id) for run_id in campaign.campaign.run_ids]
    assert [child.examples_trained for child in children] == [6, 6 + 3]
    assert [point.samples for point in campaign.campaign.timeline] == [6, 9]
    connection = trainer.reader
    events = connection.stream(
        "trainer", connection.trainer.WatchRun, trainer_pb2.WatchRunRequest(run_id=result.run_id)
    )
    said = [event.message for event in events if "replaying" in event.message]
    assert said == ["replaying 3 rows of run 1 (0.5 of this run's own)"]


def test_campaigns_that_cannot_work_are_refused_before_they_are_queued(trainer, datasets):
    with pytest.raises(ConfigError) as refused:
        trainer.multi_run(datasets[0], runs=4, samples_per_run=3, **RUN)
    assert refused.value.code == "INPUT_CONFIG_INVALID"
    assert "need 12 distinct rows; the dataset has 6" in refused.value.message
    assert "--with-replacement" in refused.value.hint

    with pytest.raises(ConfigError, match="replay is a share of each run's rows"):
        trainer.multi_run(datasets, replay=1.5, **RUN)
    with pytest.raises(ConfigError, match="merge mode 'ties'"):
        trainer.multi_run(datasets[0], runs=2, merge="ties", **RUN)
    single = trainer.train(datasets[0], steps=1, max_length=64)
    with pytest.raises(ConfigError, match="single run, not a campaign"):
        trainer.multi_run(datasets[0], runs=2, continue_from=single.run_id, **RUN)
