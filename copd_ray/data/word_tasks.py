"""Synthetic capabilities in free-form English, for a real instruct model (SmolLM2-135M).

    word_addsub  one step of adding or taking away ("Mia has 7 apples. She buys 5 more.
                 How many apples does Mia have now?"); answer: the number
    word_times   equal groups ("Tom has 6 bags with 4 marbles in each bag. How many
                 marbles does Tom have?"); answer: the number

Both are judged by the `math` reward (the final answer of the response, a \\boxed{} or a
"The answer is" / "####" line, checked with math-verify), so the system prompt tells the
model how to end. SmolLM2-135M-Instruct solves about a fifth of each greedily (it
often computes right but never states a final answer, or runs past the token limit):
RL has signal on both, and they are different skills. Harder kinds (two steps, unit
conversions, plain "What is 27 + 82?") sat at 0-3% and were left out. Built from
small vocabularies with a seeded Random, like the arithmetic tasks, so held-out,
validation and training problems never meet.
"""

from __future__ import annotations

import random

NAMES = ["Mia", "Tom", "Ana", "Leo", "Sara", "Ben", "Lily", "Omar", "Nina", "Sam", "Eva", "Max"]
SHE = {"Mia", "Ana", "Sara", "Lily", "Nina", "Eva"}
# (plural noun, verb for getting more, verb for losing some)
THINGS = [("apples", "picks", "eats"), ("books", "buys", "gives away"), ("marbles", "finds", "loses"),
          ("stickers", "gets", "gives away"), ("cookies", "bakes", "eats"), ("coins", "finds", "spends"),
          ("pencils", "buys", "loses"), ("shells", "collects", "gives away")]
CONTAINERS = ["bags", "boxes", "jars", "baskets"]


def addsub_problem(rng: random.Random) -> dict:
    name, (things, gain, lose) = rng.choice(NAMES), rng.choice(THINGS)
    pronoun = "She" if name in SHE else "He"
    a = rng.randint(2, 20)
    if rng.random() < 0.5:
        b = rng.randint(2, 20)
        story, answer = f"{name} has {a} {things}. {pronoun} {gain} {b} more.", a + b
    else:
        a += 3
        c = rng.randint(1, a - 1)
        story, answer = f"{name} has {a} {things}. {pronoun} {lose} {c}.", a - c
    return {"prompt": f"{story} How many {things} does {name} have now?", "answer": str(answer)}


def times_problem(rng: random.Random) -> dict:
    name, (things, _, _), box = rng.choice(NAMES), rng.choice(THINGS), rng.choice(CONTAINERS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return {"prompt": f"{name} has {a} {box} with {b} {things} in each {box[:-1] if box != 'boxes' else 'box'}. "
                      f"How many {things} does {name} have?", "answer": str(a * b)}
