"""The forgetting benchmark's arithmetic and tasks (bench/slao.py, bench/slao_tasks.py): the
metrics of ../shared/SLAO_BENCH.md on a matrix worked out by hand, the goal's every-run rule, and
tasks that test what training never showed. The benchmark itself runs in `make bench`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from slao import goal_holds, metrics
from slao_tasks import CITY_TEST, make_tasks

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


def run(mode: str, seed: int, order: list[int], bwt: float, acc: float) -> dict:
    return {"mode": mode, "seed": seed, "order": order, "metrics": {"BWT": bwt, "ACC": acc}}


def test_the_goal_is_claimed_only_for_runs_where_slao_beats_sequential_by_ten_bwt_points():
    runs = [
        run("slao", 0, [1, 2], -5.0, 60.0),
        run("sequential", 0, [1, 2], -15.0, 55.0),  # 10 points better, higher ACC: holds
        run("slao", 0, [2, 1], -5.0, 60.0),
        run("sequential", 0, [2, 1], -14.0, 50.0),  # 9 points: does not
        run("slao", 1, [1, 2], -5.0, 50.0),
        run("sequential", 1, [1, 2], -30.0, 55.0),  # lower ACC: does not
    ]
    assert goal_holds(runs) == {
        "seed 0 order 12": True,
        "seed 0 order 21": False,
        "seed 1 order 12": False,
    }


def test_tasks_are_the_same_for_a_seed_and_differ_between_seeds():
    assert make_tasks(0) == make_tasks(0)
    assert make_tasks(0)[0].train != make_tasks(1)[0].train


def test_each_task_tests_questions_its_training_never_asked_with_8_balanced_answers():
    for task in make_tasks(0):
        trained = {question.prompt for question in task.train}
        assert not trained & {question.prompt for question in task.test}, task.name
        assert len(task.candidates) == 8
        counts = [sum(q.answer == a for q in task.test) for a in range(8)]
        assert min(counts) > 0, f"{task.name}: an answer is never tested"


def test_the_two_fact_tasks_ask_about_the_same_names_so_they_interfere():
    city, colour, *_ = make_tasks(0)
    template = set(CITY_TEST.format("").split())
    names = {(set(question.prompt.split()) - template).pop() for question in city.test}
    assert len(names) == 64
    assert all(any(name in question.prompt for name in names) for question in colour.test)


def test_every_candidate_answer_is_one_token_of_smollm2(smollm2_tokenizer):
    """Scoring ranks the candidates by their one logit at the answer's position."""
    for task in make_tasks(0):
        for candidate in task.candidates:
            ids = smollm2_tokenizer.encode(candidate, add_special_tokens=False)
            assert len(ids) == 1, f"{task.name}: {candidate!r} is {len(ids)} tokens"
