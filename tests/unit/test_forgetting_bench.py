"""The forgetting benchmark's arithmetic, checks and tasks (bench/slao.py, bench/slao_tasks.py,
bench/slao_table.py): the metrics of ../shared/SLAO_BENCH.md on a matrix worked out by hand, the
calibration and the goal by their every-run rules, the recommendation, the documents' table
written from the results, and tasks that test what training never showed. The benchmark itself
runs in `make bench`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from lora_adapters import tiny_llama
from slao import (
    REPLAY,
    calibration,
    goal_holds,
    metrics,
    next_token_logits,
    recommended,
    shared_length,
    summary,
)
from slao_table import END, START, best_measured, markdown, shown
from slao_tasks import CONCEPTS, make_tasks

REPO = Path(__file__).resolve().parents[2]

# R[stage][task]: the base model, then after each of three tasks.
MATRIX = [
    [0.1, 0.2, 0.1],
    [0.9, 0.3, 0.2],
    [0.5, 0.8, 0.4],
    [0.6, 0.7, 0.9],
]


def test_metrics_are_those_of_the_benchmark_spec_in_points():
    result = metrics(MATRIX)
    assert result["ACC"] == pytest.approx(100 * (0.6 + 0.7 + 0.9) / 3)
    # Each task before the last: its final accuracy against the one right after learning it.
    assert result["BWT"] == pytest.approx(100 * ((0.6 - 0.9) + (0.7 - 0.8)) / 2)
    # Each task after the first: its accuracy just before learning it against the base's.
    assert result["FWT"] == pytest.approx(100 * ((0.3 - 0.2) + (0.4 - 0.1)) / 2)
    # Each task before the last: its best accuracy before the end against its final one.
    assert result["forgetting"] == pytest.approx(100 * ((0.9 - 0.6) + (0.8 - 0.7)) / 2)


def run(variant: str, seed: int, order: list[int], bwt: float, acc: float) -> dict:
    metrics = {"BWT": bwt, "ACC": acc, "FWT": 0.0, "forgetting": -bwt}
    return {"variant": variant, "seed": seed, "order": order, "metrics": metrics}


RUNS = [
    run("sequential", 0, [1, 2], -20.0, 55.0),
    run("slao", 0, [1, 2], -10.0, 55.0),  # 10 points better, the same ACC: holds
    run("slao+replay", 0, [1, 2], -2.0, 70.0),
    run("sequential", 0, [2, 1], -16.0, 50.0),
    run("slao", 0, [2, 1], -7.0, 60.0),  # 9 points: does not
    run("slao+replay", 0, [2, 1], -1.0, 68.0),
    run("sequential", 1, [1, 2], -30.0, 55.0),
    run("slao", 1, [1, 2], -5.0, 50.0),  # a lower ACC: does not
    run("slao+replay", 1, [1, 2], -3.0, 66.0),
]


def test_the_goal_holds_where_bwt_beats_sequential_by_ten_points_with_no_lower_acc():
    assert goal_holds(RUNS) == {
        "slao": {"seed 0 order 12": True, "seed 0 order 21": False, "seed 1 order 12": False},
        "slao+replay": {"seed 0 order 12": True, "seed 0 order 21": True, "seed 1 order 12": True},
    }


def test_the_recommendation_is_a_variant_meeting_the_goal_in_every_run_or_none():
    table = summary(RUNS, ["sequential", "slao", "slao+replay"])
    assert table["slao"]["BWT"] == pytest.approx((-10 - 7 - 5) / 3)
    assert table["slao"]["BWT_sd"] == pytest.approx(2.5166, abs=1e-3)
    assert recommended(goal_holds(RUNS), table) == "slao+replay"
    without = [r for r in RUNS if r["variant"] != "slao+replay"]
    assert recommended(goal_holds(without), summary(without, ["sequential", "slao"])) is None


def test_calibration_needs_every_task_learnt_alone_and_sequential_training_forgetting():
    alone = {0: [0.9, 1.0], 1: [0.86, 0.95]}
    passed = calibration(alone, RUNS)
    assert passed["passed"] and passed["short"] == []
    assert passed["sequential_BWT"]["seed 0 order 21"] == -16.0

    failed = calibration({0: [0.9, 0.84]}, [*RUNS[:3], run("sequential", 0, [2, 1], -14.0, 50)])
    assert not failed["passed"]
    assert failed["short"] == ["seed 0: task 2 alone 84%", "seed 0 order 21: sequential BWT -14.0"]
    assert not calibration(alone, [])["passed"]  # nothing measured: nothing calibrated


def results(runs: list[dict]) -> dict:
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    table = summary(runs, variants)
    goal = goal_holds(runs)
    settings = {"seeds": [0, 1], "orders": [[0, 1], [1, 0]], "steps": 80, "learning_rate": 3e-3}
    settings |= {"lora_r": 8, "targets": "all-linear", "batch_size": 8, "replay": 0.1}
    return {
        "machine": "x86_64, 2 threads",
        "dtype": "bfloat16",
        "settings": settings,
        "wall_seconds": 600,
        "calibration": calibration({0: [0.9, 1.0], 1: [0.86, 0.95]}, runs),
        "summary": table,
        "multitask_upper_bound_ACC": 80.0,
        "multitask_upper_bound_seed": 0,
        "goal": goal,
        "recommended": recommended(goal, table),
        "runs": runs,
    }


def test_the_documents_table_shows_each_variant_the_calibration_and_the_goal_run_by_run():
    text = markdown(results(RUNS))
    assert "| slao+replay | 68.0 ± 2.0 | -2.0 ± 1.0 | 0.0 ± 0.0 | 2.0 ± 1.0 |" in text
    assert "Calibration (every task alone" in text and "passed." in text
    assert "seed 1 86%, 95%" in text
    assert "Multi-task upper bound: ACC 80.0 (seed 0)." in text
    assert "- slao: 1 of 3 runs" in text and "- slao+replay: 3 of 3 runs" in text
    assert "Meets the goal in every run: **slao+replay**" in text
    assert "2 seeds x 2 orders, 80 steps a task" in text and "10.0 min" in text
    nothing = markdown(results([r for r in RUNS if r["variant"] != "slao+replay"]))
    assert "No variant meets the goal in every run. Measured best (mean ACC, then BWT): " in nothing
    assert "**slao**, ACC" in nothing  # the better of the two left, sequential aside


def test_the_documents_show_the_last_full_run_of_the_benchmark():
    """docs/multi-run.md and the README carry the table the results file gives (bench/slao.py
    writes them; `python bench/slao_table.py` writes them again)."""
    import json

    from slao_table import section

    measured = json.loads((REPO / "bench" / "results" / "slao.json").read_text())
    assert not measured.get("quick"), "a --quick run's results were committed"
    for document in (REPO / "docs" / "multi-run.md", REPO / "README.md"):
        assert shown(document) == section(measured), f"{document.name}: run bench/slao_table.py"
    assert START in section(measured) and END in section(measured)


def test_the_products_default_is_the_variant_the_last_full_run_recommends():
    """The tables say `backprop multi-run`'s default follows the measurement: its merge mode
    and its replay share are those of the recommended variant, as measured (the best measured
    where none meets the goal)."""
    import json

    from backpropagate_api.training import DEFAULT_REPLAY
    from backpropagate_services.trainer.multirun.campaign_plan import DEFAULT_MERGE

    measured = json.loads((REPO / "bench" / "results" / "slao.json").read_text())
    default = f"{DEFAULT_MERGE}{REPLAY}" if DEFAULT_REPLAY else DEFAULT_MERGE
    assert (measured["recommended"] or best_measured(measured["summary"])) == default
    assert measured["settings"]["replay"] == DEFAULT_REPLAY


def test_tasks_are_the_same_for_a_seed_and_differ_between_seeds():
    assert make_tasks(0) == make_tasks(0)
    assert [t.candidates for t in make_tasks(0)] != [t.candidates for t in make_tasks(1)]


def test_each_task_tests_questions_its_training_never_asked_with_8_balanced_answers():
    for task in make_tasks(0):
        trained = {question.prompt for question in task.train}
        assert not trained & {question.prompt for question in task.test}, task.name
        assert len(task.candidates) == 8
        counts = [sum(q.answer == a for q in task.test) for a in range(8)]
        assert len(set(counts)) == 1, f"{task.name}: answers tested unevenly {counts}"


def test_label_sets_are_disjoint_and_no_label_is_a_word_its_task_asks_about():
    labels = [set(concept.labels) for concept in CONCEPTS]
    assert sum(map(len, labels)) == len(set().union(*labels))
    for concept in CONCEPTS:
        words = {word for class_words in concept.classes.values() for word in class_words}
        assert not words & set(concept.labels), concept.name


def test_the_kind_and_colour_tasks_ask_about_some_of_the_same_things_so_they_interfere():
    kind, colour = (c for c in CONCEPTS if c.name in ("kind", "colour"))
    shared = {w for ws in kind.classes.values() for w in ws} & {
        w for ws in colour.classes.values() for w in ws
    }
    assert len(shared) >= 4, shared


def test_every_candidate_answer_is_one_token_of_smollm2(smollm2_tokenizer):
    """Scoring ranks the candidates by their one logit at the answer's position."""
    for task in make_tasks(0):
        for candidate in task.candidates:
            ids = smollm2_tokenizer.encode(candidate, add_special_tokens=False)
            assert len(ids) == 1, f"{task.name}: {candidate!r} is {len(ids)} tokens"


def test_the_shared_opening_is_the_common_prefix_leaving_each_prompt_a_token_of_its_own():
    assert shared_length([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 7]]) == 2
    assert shared_length([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert shared_length([[1, 2], [3, 2]]) == 0


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("opening", [[5, 9, 2, 7], []], ids=["shared opening", "none shared"])
def test_scoring_from_the_shared_openings_cache_gives_each_whole_prompts_logits(
    attention: str, opening: list[int]
):
    import torch

    model = tiny_llama().eval()
    model.set_attn_implementation(attention)
    generator = torch.Generator().manual_seed(3)
    prompts = [
        opening + torch.randint(10, 128, (length,), generator=generator).tolist()
        for length in (1, 6, 3, 9, 2, 6, 4) * 11  # 77 prompts: two batches, ragged lengths
    ]
    with torch.no_grad():
        whole = torch.stack([model(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts])
    assert torch.allclose(next_token_logits(model, prompts, pad_id=0), whole, atol=1e-5)
