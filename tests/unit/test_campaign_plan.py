"""Which rows each run of a campaign draws, and the campaigns refused before they are queued
(services/trainer/multirun/campaign_plan.py)."""

from __future__ import annotations

import pytest

from backpropagate_api.errors import ConfigError
from backpropagate_api.training import DEFAULT_REPLAY
from backpropagate_api.v1 import common_pb2, trainer_pb2
from backpropagate_services.trainer.multirun.campaign_plan import (
    CampaignPlan,
    check_campaign_config,
    check_continuable,
    settle_campaign,
)


def plan(runs: int, samples: int, *, replacement: bool = False, datasets: int = 1) -> CampaignPlan:
    return CampaignPlan(runs, samples, replacement, 7, tuple(f"d{i}" for i in range(datasets)))


def test_runs_drawing_from_one_pool_never_share_a_row():
    campaign = plan(4, 25)

    drawn = [campaign.rows_of(run, 100) for run in range(1, 5)]

    assert all(len(rows) == 25 for rows in drawn)
    assert len(set().union(*map(set, drawn))) == 100
    assert drawn == [plan(4, 25).rows_of(run, 100) for run in range(1, 5)]  # seeded: the same
    assert drawn != [CampaignPlan(4, 25, False, 8, ("d0",)).rows_of(r, 100) for r in range(1, 5)]


def test_no_sample_size_gives_each_run_an_equal_share():
    assert [len(plan(3, 0).rows_of(run, 10)) for run in (1, 2, 3)] == [3, 3, 3]


def test_with_replacement_runs_draw_from_the_whole_pool_on_their_own():
    campaign = plan(3, 8, replacement=True)

    drawn = [campaign.rows_of(run, 10) for run in (1, 2, 3)]

    assert all(len(rows) == 8 and set(rows) <= set(range(10)) for rows in drawn)
    assert set(drawn[0]) & set(drawn[1])  # 8 of 10 rows twice: they must overlap


def test_several_datasets_are_one_a_run():
    campaign = plan(3, 0, datasets=3)

    assert [campaign.dataset_of(run) for run in (1, 2, 3)] == ["d0", "d1", "d2"]
    assert campaign.rows_of(2, 6) == list(range(6))
    assert sorted(set(plan(3, 4, datasets=3).rows_of(2, 6))) == plan(3, 4, datasets=3).rows_of(2, 6)


def test_replay_draws_a_share_of_a_runs_rows_from_the_rows_earlier_runs_trained_on():
    campaign = CampaignPlan(4, 20, False, 7, ("pool",), replay=0.25)
    sizes = {"pool": 100}

    replayed = [campaign.replayed_of(run, sizes) for run in (1, 2, 3, 4)]

    assert [len(rows) for rows in replayed] == [0, 5, 5, 5]
    for run, rows in enumerate(replayed, start=1):
        assert len(set(rows)) == len(rows)  # no row twice
        for before, index in rows:
            assert before < run and index in campaign.rows_of(before, 100)
    assert {before for before, _ in replayed[3]} <= {1, 2, 3}
    assert replayed == [campaign.replayed_of(run, sizes) for run in (1, 2, 3, 4)]  # seeded
    assert CampaignPlan(4, 20, False, 7, ("pool",)).replayed_of(3, sizes) == []


def test_replay_across_datasets_names_each_rows_run_and_at_least_one_row_is_replayed():
    campaign = CampaignPlan(3, 0, False, 7, ("a", "b", "c"), replay=0.01)
    sizes = {"a": 4, "b": 10, "c": 30}

    [(before, index)] = campaign.replayed_of(3, sizes)  # 0.01 of 30 rows rounds up to one

    assert before in (1, 2) and index < sizes[campaign.dataset_of(before)]
    wide = CampaignPlan(3, 0, False, 7, ("a", "b", "c"), replay=1).replayed_of(2, sizes)
    assert sorted(wide) == [(1, index) for index in range(4)]  # all run 1 had, no more


def test_replay_outside_zero_to_one_is_refused():
    for replay in (-0.1, 1.5):
        with pytest.raises(ConfigError) as refused:
            settle(2, 0, [10], replay=replay)
        assert refused.value.context["fields"] == "replay" and "--replay 0.1" in refused.value.hint
    assert settle(2, 0, [10], replay=1).replay == 1


def test_a_campaign_replays_a_tenth_unless_it_says_otherwise_and_zero_turns_replay_off():
    assert settle(2, 0, [10]).replay == DEFAULT_REPLAY == 0.1
    turned_off = settle(2, 0, [10], replay=0)
    assert turned_off.HasField("replay") and turned_off.replay == 0
    assert CampaignPlan.of(trainer_pb2.CampaignInfo(config=turned_off), 0).replay == 0


def settle(runs: int, samples: int, sizes: list[int], **fields) -> trainer_pb2.MultiRunConfig:
    return settle_campaign(
        trainer_pb2.MultiRunConfig(runs=runs, samples_per_run=samples, **fields), sizes
    )


def test_a_campaign_larger_than_its_pool_is_refused_with_a_hint():
    with pytest.raises(ConfigError) as refused:
        settle(5, 1000, [3000])

    assert refused.value.code == "INPUT_CONFIG_INVALID"
    assert "5000 distinct rows" in refused.value.message and "3000" in refused.value.message
    assert "--samples to 600" in refused.value.hint and "--with-replacement" in refused.value.hint


def test_with_replacement_a_campaign_may_be_larger_than_its_pool():
    settled = settle(5, 1000, [3000], with_replacement=True)

    assert (settled.runs, settled.merge) == (5, "slao")


def test_runs_default_to_one_per_dataset_and_must_match_them():
    assert settle(0, 0, [10, 20, 30]).runs == 3
    with pytest.raises(ConfigError, match="3 datasets were given for 2 runs"):
        settle(2, 0, [10, 20, 30])
    with pytest.raises(ConfigError, match="Run 2's dataset has 5 rows"):
        settle(0, 8, [10, 5])
    with pytest.raises(ConfigError, match="between 1 and"):
        settle(0, 0, [10])


def test_an_unknown_merge_mode_is_refused_naming_the_modes():
    with pytest.raises(ConfigError) as refused:
        settle(2, 0, [10], merge="ties")

    assert "slao, last-merge, no-qr, average, sequential" in refused.value.hint


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"method": "dpo"}, "method"),
        ({"adapter": "dora"}, "adapter"),
        ({"adapter": "full"}, "adapter"),
        ({"adapter_scale": 0.5}, "adapter_scale"),
    ],
)
def test_what_a_campaign_cannot_merge_is_refused(fields, named):
    with pytest.raises(ConfigError) as refused:
        check_campaign_config(trainer_pb2.TrainConfig(**fields))

    assert refused.value.context["fields"] == named


def campaign_record(merge: str = "slao", **fields) -> trainer_pb2.RunRecord:
    fields.setdefault("status", common_pb2.JOB_STATUS_SUCCEEDED)
    record = trainer_pb2.RunRecord(run_id="campaign-1", base_model="m", **fields)
    record.campaign.config.merge = merge
    return record


def test_only_a_finished_campaign_of_the_same_merge_and_shape_is_continued():
    check_continuable(campaign_record(), campaign_record())
    # Submitted without a GPU (the default adapter), continued where a memory plan named it.
    check_continuable(campaign_record(), campaign_record(config={"adapter": "lora"}))
    single = trainer_pb2.RunRecord(run_id="run-1", status=common_pb2.JOB_STATUS_SUCCEEDED)
    unfinished = campaign_record(status=common_pb2.JOB_STATUS_FAILED)
    for earlier, now, why in [
        (single, campaign_record(), "single run"),
        (unfinished, campaign_record(), "has not finished"),
        (campaign_record("average"), campaign_record(), "merge 'average'"),
        (campaign_record(config={"lora_r": 8}), campaign_record(config={"lora_r": 16}), "lora_r"),
        (campaign_record(), campaign_record(config={"adapter": "qlora"}), "adapter 'lora'"),
    ]:
        with pytest.raises(ConfigError, match=why):
            check_continuable(earlier, now)
