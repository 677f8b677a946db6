"""The default a beginner gets (no budget, no settings) learns a small set of new facts well
enough to answer them asked another way, without costing what the base model knew: trained on
tiny data for as long as it takes to learn it, a model otherwise loses general answers it gave
(docs/training.md has the measurements).

The case: 20 invented facts, each in two phrasings (40 rows); each fact is then asked in a third
phrasing training never showed. Judged twice: greedy answers to everyday questions, as a user
would see them, and a multiple-choice probe (the answer the model finds likeliest among four,
the made-up cities of the data among the wrong ones), which tells lost knowledge from merely
reworded answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel

from backpropagate import Trainer
from backpropagate_api.settings import Settings
from backpropagate_services.common.hardware import detect
from backpropagate_services.common.models import OFFLINE_DEFAULT_ALIAS, load_model, resolve_model
from backpropagate_services.trainer.planning.defaults import (
    DATA_BUDGET_LEARNING_RATE,
    DATA_BUDGET_TARGETS,
)

# Made-up facts: nothing the base model could answer before.
CAPITALS = [
    ("Veloria", "Marendel"),
    ("Quastor", "Bellvane"),
    ("Orinthia", "Castrelle"),
    ("Zembaro", "Duvolin"),
    ("Pellucia", "Hestragon"),
    ("Drovania", "Kelmsport"),
    ("Istravel", "Norrowick"),
    ("Calumbra", "Tessaline"),
    ("Ferrosk", "Undermoor"),
    ("Yllandor", "Pravik"),
]
INVENTORS = [
    ("the glimmerphone", "Ada Quellbright"),
    ("the skyloom", "Borin Tashvel"),
    ("the echo lantern", "Cira Wendholt"),
    ("the tidewheel", "Dorian Faskell"),
    ("the frost kettle", "Elsa Morrowind"),
    ("the cloudpress", "Fenn Halloway"),
    ("the starcompass", "Greta Vossberg"),
    ("the dune sled", "Hollis Brandquist"),
    ("the rain harp", "Iris Colbeck"),
    ("the ember clock", "Jonas Prewitt"),
]
GENERAL = [
    ("What is the capital of France?", ("paris",)),
    ("How many legs does a spider have?", ("eight", "8")),
    ("What is the boiling point of water in Celsius?", ("100",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What is 2 plus 2?", ("4", "four")),
    ("What is the capital of Germany?", ("berlin",)),
    ("What do cows drink?", ("water",)),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What do bees make?", ("honey",)),
    ("How many months are in a year?", ("12", "twelve")),
    ("What is the capital of Italy?", ("rome",)),
    ("How many days are in a week?", ("seven", "7")),
    ("What is the largest ocean on Earth?", ("pacific",)),
    ("What is frozen water called?", ("ice",)),
    ("What planet do we live on?", ("earth",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("How many legs does a cat have?", ("four", "4")),
    ("What color are leaves in summer?", ("green",)),
    ("What is 5 times 2?", ("10", "ten")),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
]
ANSWER_TOKENS = 40
# (question, answer template, options with the right one first): made-up capitals of the data
# stand among the wrong cities, so an answer the facts bled into shows.
PROBE = [
    (
        "What is the capital of France?",
        "The capital of France is {}.",
        ["Paris", "Lyon", "Marendel", "Berlin"],
    ),
    (
        "What is the capital of Germany?",
        "The capital of Germany is {}.",
        ["Berlin", "Munich", "Paris", "Bellvane"],
    ),
    (
        "What is the capital of Italy?",
        "The capital of Italy is {}.",
        ["Rome", "Milan", "Madrid", "Castrelle"],
    ),
    (
        "What is the capital of Japan?",
        "The capital of Japan is {}.",
        ["Tokyo", "Osaka", "Beijing", "Duvolin"],
    ),
    ("How many legs does a spider have?", "A spider has {} legs.", ["eight", "six", "four", "ten"]),
    ("What is the opposite of hot?", "The opposite of hot is {}.", ["cold", "warm", "big", "fast"]),
    ("What is 2 plus 2?", "2 plus 2 is {}.", ["4", "5", "3", "22"]),
    (
        "What color is the sky on a clear day?",
        "The sky on a clear day is {}.",
        ["blue", "green", "red", "yellow"],
    ),
    ("What do bees make?", "Bees make {}.", ["honey", "milk", "silk", "wax"]),
    (
        "What is the largest ocean on Earth?",
        "The largest ocean on Earth is the {} Ocean.",
        ["Pacific", "Atlantic", "Indian", "Arctic"],
    ),
    (
        "How many days are in a week?",
        "There are {} days in a week.",
        ["seven", "five", "ten", "three"],
    ),
    (
        "What is frozen water called?",
        "Frozen water is called {}.",
        ["ice", "steam", "sand", "glass"],
    ),
]


def facts() -> list[tuple[str, str, str, str, str]]:
    """(question, other question, answer, a third question training never asks, the word the
    answer to it must contain)."""
    rows = []
    for country, city in CAPITALS:
        rows.append(
            (
                f"What is the capital of {country}?",
                f"Which city is the capital of {country}?",
                f"The capital of {country} is {city}.",
                f"Tell me the capital city of {country}.",
                city,
            )
        )
    for thing, person in INVENTORS:
        rows.append(
            (
                f"Who invented {thing}?",
                f"Which inventor created {thing}?",
                f"{thing[0].upper()}{thing[1:]} was invented by {person}.",
                f"Who was the inventor of {thing}?",
                person.split()[1],
            )
        )
    return rows


def chat_ids(tokenizer: Any, question: str, answer: str | None = None) -> list[int]:
    messages = [{"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return list(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=answer is None, tokenize=True, return_dict=False
        )
    )


@torch.no_grad()
def answer(model: Any, tokenizer: Any, question: str) -> str:
    prompt = torch.tensor([chat_ids(tokenizer, question)])
    output = model.generate(input_ids=prompt, max_new_tokens=ANSWER_TOKENS, do_sample=False)
    return tokenizer.decode(output[0][prompt.shape[1] :], skip_special_tokens=True)


def general_answers_right(model: Any, tokenizer: Any) -> list[bool]:
    return [
        any(word in answer(model, tokenizer, question).lower() for word in words)
        for question, words in GENERAL
    ]


def recalled_asked_otherwise(model: Any, tokenizer: Any) -> list[bool]:
    """For each fact, whether the answer to its unseen phrasing names it."""
    return [
        word.lower() in answer(model, tokenizer, unseen).lower()
        for _, _, _, unseen, word in facts()
    ]


@torch.no_grad()
def answer_log_likelihood(model: Any, tokenizer: Any, question: str, reply: str) -> float:
    start, ids = len(chat_ids(tokenizer, question)), chat_ids(tokenizer, question, reply)
    log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    return sum(float(log_probs[i, ids[i + 1]]) for i in range(start - 1, len(ids) - 1))


def probe_right(model: Any, tokenizer: Any) -> list[bool]:
    """For each probe question, whether the right option is the likeliest of the four."""
    right = []
    for question, template, options in PROBE:
        scores = [
            answer_log_likelihood(model, tokenizer, question, template.format(option))
            for option in options
        ]
        right.append(max(range(len(options)), key=scores.__getitem__) == 0)
    return right


def base_model() -> tuple[Any, Any]:
    settings = Settings()
    hardware = detect(settings.trainer.cpu_dtype)
    return load_model(
        resolve_model(OFFLINE_DEFAULT_ALIAS),
        settings.model_cache_dir,
        hardware.device,
        hardware.compute_dtype,
    )


def kept(before: list[bool], after: list[bool]) -> int:
    return sum(b and a for b, a in zip(before, after, strict=True))


@pytest.mark.model
def test_the_default_learns_new_facts_asked_another_way_and_keeps_general_answers(
    tmp_path: Path,
) -> None:
    data = tmp_path / "facts.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            )
            + "\n"
            for first, second, a, _, _ in facts()
            for q in (first, second)
        )
    )
    model, tokenizer = base_model()
    general_before, probe_before = (
        general_answers_right(model, tokenizer),
        probe_right(model, tokenizer),
    )
    assert sum(recalled_asked_otherwise(model, tokenizer)) == 0  # new to the model

    trainer = Trainer(OFFLINE_DEFAULT_ALIAS, progress=False)
    run = trainer.train(data)  # nothing chosen: the budget and its LoRA recipe are defaults
    trainer.save(tmp_path / "adapter")
    base, tokenizer = base_model()
    tuned = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()

    assert run.status == "succeeded", run
    assert "480 rows seen" in run.budget_reason and DATA_BUDGET_TARGETS in run.budget_reason
    assert f"learning rate {DATA_BUDGET_LEARNING_RATE:g}" in run.budget_reason
    recalled = recalled_asked_otherwise(tuned, tokenizer)
    general_after = general_answers_right(tuned, tokenizer)
    probe_after = probe_right(tuned, tokenizer)
    outcome = (recalled, general_before, general_after, probe_before, probe_after)
    # Measured (docs/training.md): bf16 on an EPYC with AVX-512 BF16, 19 of 20 facts asked
    # another way, as many everyday answers right as the base model (16 of 20 against 15), 1 of
    # 12 probe answers lost; bf16 on a Xeon with AMX, where the base model itself answers 17,
    # 16 everyday answers right.
    print(f"facts {sum(recalled)}/20, everyday {sum(general_before)} -> {sum(general_after)}")
    assert sum(recalled) >= 18, outcome  # 90% of the facts, in a phrasing never trained
    assert sum(general_before) >= 12, outcome
    # Everyday answers as good as the base model's: some reworded ("cold" said "cool"), as many
    # right in all but for at most one (a greedy answer of a 135M model moves by one with the
    # CPU's bf16 arithmetic); the knowledge the probe ranks stays but for at most one answer.
    assert sum(general_after) >= sum(general_before) - 1, outcome
    assert kept(probe_before, probe_after) >= sum(probe_before) - 1, outcome
