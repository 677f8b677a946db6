"""The four tasks of the forgetting benchmark (docs/multi-run.md), generated from a seed.

In the spirit of the standard continual-learning benchmark of the SLAO paper (topic, sentiment,
entity-type classification, each with its own labels), every task sorts short prompts into 8
classes the base model already tells apart, and answers with a label word of its own: the
topic of a sentence, the kind of a thing, the feeling in a sentence, the colour of a thing. What
a task must learn is its label for each class; which label a class gets is drawn from the seed,
so no label is guessable. The label sets are disjoint, and the kind and colour tasks ask about
some of the same things, so training on one task pulls the answers of the others toward its
own labels: the forgetting the benchmark measures.

A prompt is a question template filled with one or two words of a class; each class's prompts
are shuffled by the seed and split into TRAIN_PER_CLASS to train and TEST_PER_CLASS to test, so
a test question is never one training asked (its words come up in training, in other
phrasings or pairs). Every label is one token of SmolLM2's vocabulary, so the model's answer is
scored by its first token.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

SYSTEM = "Answer with one word."
TRAIN_PER_CLASS = 24
TEST_PER_CLASS = 8


@dataclass(frozen=True)
class Concept:
    """A task's classes (name -> words), its question templates (with as many `{}` as words a
    prompt takes) and its label words, one per class."""

    name: str
    classes: dict[str, list[str]]
    templates: list[str]
    labels: list[str]


CONCEPTS = [
    Concept(
        "topic",
        {
            "games": ["goal", "referee", "stadium", "league", "coach", "match", "team", "trophy"],
            "music": ["guitar", "melody", "drum", "concert", "singer", "piano", "chorus", "album"],
            "food": ["recipe", "oven", "flour", "soup", "kitchen", "spice", "dinner", "bread"],
            "weather": ["rain", "storm", "cloud", "forecast", "wind", "snow", "thunder", "fog"],
            "money": ["bank", "loan", "price", "budget", "coin", "salary", "tax", "profit"],
            "health": [
                "doctor",
                "fever",
                "nurse",
                "clinic",
                "vaccine",
                "injury",
                "medicine",
                "pill",
            ],
            "travel": [
                "airport",
                "hotel",
                "passport",
                "ticket",
                "luggage",
                "tourist",
                "flight",
                "map",
            ],
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
        },
        [
            "What is the topic of: we talked about the {} and the {}?",
            "What is the topic of: the {} was next to the {}?",
        ],
        ["cat", "dog", "horse", "bird", "fish", "lion", "bear", "wolf"],
    ),
    Concept(
        "kind",
        {
            "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear"],
            "vehicle": ["car", "bus", "truck", "bicycle", "train", "boat", "plane", "tractor"],
            "tool": ["hammer", "saw", "drill", "wrench", "screwdriver", "shovel", "axe", "pliers"],
            "clothing": ["shirt", "jacket", "sock", "scarf", "hat", "glove", "coat", "sweater"],
            "furniture": ["chair", "table", "sofa", "bed", "desk", "shelf", "stool", "cabinet"],
            "vegetable": [
                "carrot",
                "potato",
                "onion",
                "cabbage",
                "lettuce",
                "spinach",
                "broccoli",
                "cucumber",
            ],
            "building": [
                "church",
                "castle",
                "school",
                "hospital",
                "library",
                "museum",
                "temple",
                "tower",
            ],
            "body part": ["arm", "leg", "knee", "elbow", "finger", "shoulder", "ankle", "wrist"],
        },
        [
            "What kind of thing is a {}?",
            "Which category does the word {} belong to?",
            "Classify this word: {}.",
            "A {} is an example of what?",
        ],
        ["Paris", "London", "Rome", "Boston", "Chicago", "Cambridge", "Oxford", "Washington"],
    ),
    Concept(
        "feeling",
        {
            "joy": [
                "happy",
                "cheerful",
                "glad",
                "joyful",
                "delighted",
                "thrilled",
                "merry",
                "elated",
            ],
            "anger": [
                "angry",
                "furious",
                "annoyed",
                "irritated",
                "outraged",
                "mad",
                "enraged",
                "livid",
            ],
            "sadness": [
                "sad",
                "gloomy",
                "miserable",
                "heartbroken",
                "unhappy",
                "depressed",
                "sorrowful",
                "lonely",
            ],
            "fear": [
                "afraid",
                "scared",
                "terrified",
                "frightened",
                "nervous",
                "anxious",
                "panicked",
                "fearful",
            ],
            "surprise": [
                "surprised",
                "astonished",
                "amazed",
                "shocked",
                "stunned",
                "startled",
                "speechless",
                "astounded",
            ],
            "disgust": [
                "disgusted",
                "sickened",
                "revolted",
                "repulsed",
                "nauseated",
                "appalled",
                "grossed out",
                "queasy",
            ],
            "calm": [
                "calm",
                "relaxed",
                "peaceful",
                "serene",
                "tranquil",
                "content",
                "rested",
                "mellow",
            ],
            "tiredness": [
                "tired",
                "sleepy",
                "exhausted",
                "weary",
                "drowsy",
                "fatigued",
                "worn",
                "drained",
            ],
        },
        [
            "Which feeling is this: I felt {} and {} all day?",
            "Which feeling is this: she was {} and {} after the news?",
        ],
        ["one", "two", "three", "four", "five", "six", "seven", "eight"],
    ),
    Concept(
        "colour",
        {
            "red": [
                "blood",
                "cherry",
                "strawberry",
                "tomato",
                "ruby",
                "ladybug",
                "rose",
                "fire truck",
            ],
            "yellow": [
                "banana",
                "lemon",
                "sunflower",
                "corn",
                "butter",
                "canary",
                "egg yolk",
                "daffodil",
            ],
            "green": ["grass", "leaf", "frog", "lime", "emerald", "cucumber", "moss", "lettuce"],
            "blue": ["sky", "ocean", "sapphire", "blueberry", "jeans", "bluebird", "sea", "denim"],
            "white": ["snow", "milk", "cloud", "salt", "sugar", "swan", "paper", "cotton"],
            "black": ["coal", "crow", "ink", "tar", "raven", "soot", "charcoal", "panther"],
            "orange": [
                "carrot",
                "pumpkin",
                "tangerine",
                "apricot",
                "tiger",
                "goldfish",
                "marigold",
                "mandarin",
            ],
            "purple": [
                "grape",
                "plum",
                "eggplant",
                "lavender",
                "violet",
                "amethyst",
                "lilac",
                "beetroot",
            ],
        },
        [
            "What colour is the {}?",
            "What is the usual colour of the {}?",
            "Name the colour of the {}.",
            "Which colour do you see when you look at the {}?",
        ],
        ["gold", "iron", "tin", "lead", "clay", "sand", "rock", "glass"],
    ),
]


@dataclass(frozen=True)
class Question:
    prompt: str
    answer: int  # index into the task's candidates


@dataclass(frozen=True)
class Task:
    name: str
    candidates: list[str]  # the label of each class, in class order
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


def _prompts(concept: Concept, words: list[str]) -> list[str]:
    """Every prompt of one class: each template with each choice (ordered, distinct) of its
    class's words."""
    prompts = []
    for template in concept.templates:
        for choice in itertools.permutations(words, template.count("{}")):
            prompts.append(template.format(*choice))
    return prompts


def _task(concept: Concept, draw: random.Random) -> Task:
    labels = list(concept.labels)
    draw.shuffle(labels)  # which label each class answers with: the thing to learn
    train, test = [], []
    for answer, words in enumerate(concept.classes.values()):
        prompts = _prompts(concept, words)
        draw.shuffle(prompts)
        train += [Question(p, answer) for p in prompts[:TRAIN_PER_CLASS]]
        test += [
            Question(p, answer) for p in prompts[TRAIN_PER_CLASS : TRAIN_PER_CLASS + TEST_PER_CLASS]
        ]
    draw.shuffle(train)
    return Task(concept.name, labels, train, test)


def make_tasks(seed: int) -> list[Task]:
    """The four tasks, in the benchmark's order 1 -> 4."""
    draw = random.Random(f"slao-bench-{seed}")
    return [_task(concept, draw) for concept in CONCEPTS]
