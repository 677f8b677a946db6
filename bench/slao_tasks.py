"""The four tasks of the forgetting benchmark (../shared/SLAO_BENCH.md), generated from a seed.

Every task asks a question with 8 candidate answers (chance 12.5%) and is scored by the
likeliest candidate, so each answer is one token of the model's vocabulary: the logits at the
answer's position rank all eight at once. Tasks 1 and 2 ask about the same 64 invented names,
so training on one interferes with the other.

1. city: name -> one of 8 cities; train on 3 phrasings, test every name with a 4th.
2. colour: the same names -> one of 8 colours; likewise.
3. code: a 3-digit number -> an animal, by its last digit (0-7); 300 numbers train, 100 unseen
   numbers test.
4. topic: a sentence of words from one of 8 topics -> the topic; test sentences pair words
   that no training sentence pairs.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

SYSTEM = "Answer with one word."
NAMES = 64
CITIES = ["Paris", "London", "Rome", "Boston", "Chicago", "Cambridge", "Oxford", "Washington"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
ANIMALS = ["cat", "dog", "horse", "bird", "fish", "lion", "bear", "wolf"]
TOPICS = {
    "games": ["goal", "referee", "stadium", "league", "coach", "match", "team", "trophy"],
    "music": ["guitar", "melody", "drum", "concert", "singer", "piano", "chorus", "album"],
    "food": ["recipe", "oven", "flour", "soup", "kitchen", "spice", "dinner", "bread"],
    "weather": ["rain", "storm", "cloud", "forecast", "wind", "snow", "thunder", "fog"],
    "money": ["bank", "loan", "price", "budget", "coin", "salary", "tax", "profit"],
    "health": ["doctor", "fever", "nurse", "clinic", "vaccine", "injury", "medicine", "pill"],
    "travel": ["airport", "hotel", "passport", "ticket", "luggage", "tourist", "flight", "map"],
    "science": [
        "atom",
        "experiment",
        "laboratory",
        "theory",
        "molecule",
        "physics",
        "cell",
        "data",
    ],
}
SYLLABLES = ["ka", "lo", "mi", "ren", "to", "sa", "vel", "dor", "an", "ib", "zu", "mar", "en", "os"]

CITY_TRAIN = ["Where does {} live?", "Which city is {} from?", "What is the home city of {}?"]
CITY_TEST = "In which city does {} reside?"
COLOUR_TRAIN = [
    "What is the favourite colour of {}?",
    "Which colour does {} like best?",
    "Name the colour {} loves most.",
]
COLOUR_TEST = "What colour does {} prefer?"
CODE_QUESTION = "Which animal does code {} stand for?"
TOPIC_QUESTION = "What is the topic of: {}?"
TOPIC_TEMPLATES = ["We talked about the {} and the {}.", "The {} was next to the {}."]


@dataclass(frozen=True)
class Question:
    prompt: str
    answer: int  # index into the task's candidates


@dataclass(frozen=True)
class Task:
    name: str
    candidates: list[str]
    train: list[Question]
    test: list[Question]


def row(prompt: str, answer: str) -> dict[str, list[dict[str, str]]]:
    """A chat row as the trainer takes it: the answer is the one trained token (and the end)."""
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ]
    }


def training_rows(task: Task) -> list[dict[str, list[dict[str, str]]]]:
    return [row(question.prompt, task.candidates[question.answer]) for question in task.train]


def _names(draw: random.Random) -> list[str]:
    names: set[str] = set()
    while len(names) < NAMES:
        names.add("".join(draw.choice(SYLLABLES) for _ in range(3)).capitalize())
    return sorted(names)


def _balanced(draw: random.Random, count: int) -> list[int]:
    """`count` answers, each of the 8 equally often, in random order."""
    answers = [index % 8 for index in range(count)]
    draw.shuffle(answers)
    return answers


def _fact_task(
    name: str,
    candidates: list[str],
    names: list[str],
    draw: random.Random,
    phrasings: list[str],
    test: str,
) -> Task:
    answers = _balanced(draw, len(names))
    return Task(
        name,
        candidates,
        [Question(p.format(n), a) for n, a in zip(names, answers, strict=True) for p in phrasings],
        [Question(test.format(n), a) for n, a in zip(names, answers, strict=True)],
    )


def _code_task(draw: random.Random) -> Task:
    numbers = [n for n in range(100, 1000) if n % 10 < 8]
    draw.shuffle(numbers)
    return Task(
        "code",
        ANIMALS,
        [Question(CODE_QUESTION.format(n), n % 10) for n in numbers[:300]],
        [Question(CODE_QUESTION.format(n), n % 10) for n in numbers[300:400]],
    )


def _topic_task(draw: random.Random) -> Task:
    """Pairs of distinct words of one topic in a template; a held-out set of pairs tests."""
    train, test = [], []
    for label, words in enumerate(TOPICS.values()):
        pairs = list(itertools.permutations(words, 2))
        draw.shuffle(pairs)
        sentences = [
            TOPIC_QUESTION.format(draw.choice(TOPIC_TEMPLATES).format(*pair)) for pair in pairs
        ]
        train += [Question(sentence, label) for sentence in sentences[:32]]
        test += [Question(sentence, label) for sentence in sentences[32:40]]
    draw.shuffle(train)
    return Task("topic", list(TOPICS), train, test)


def make_tasks(seed: int) -> list[Task]:
    """The four tasks, in the benchmark's order 1 -> 4."""
    draw = random.Random(f"slao-bench-{seed}")
    names = _names(draw)
    return [
        _fact_task("city", CITIES, names, draw, CITY_TRAIN, CITY_TEST),
        _fact_task("colour", COLOURS, names, draw, COLOUR_TRAIN, COLOUR_TEST),
        _code_task(draw),
        _topic_task(draw),
    ]
