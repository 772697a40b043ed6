"""Synthetic capabilities with verifiable answers, for the tiny policy.

Two arithmetic families that a small model learns at different speeds (addition is
quick, multiplication slow), which is what makes their RL branches diverge. Held-out
sets are fixed by a string seed (stable across processes, unlike `hash()`), and the
training stream never yields a held-out prompt.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from copd_ray.data.records import PromptRecord


def _add_problem(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(1000), rng.randrange(1000)
    return f"{a:03d}+{b:03d}=", str(a + b)


def _mul_problem(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(1000), rng.randrange(2, 10)
    return f"{a:03d}*{b}=", str(a * b)


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add_problem,
    "mul": _mul_problem,
}


def _task(name: str) -> Callable[[random.Random], tuple[str, str]]:
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]


def heldout_set(task: str, size: int, seed: int = 0, capability: str | None = None) -> list[PromptRecord]:
    """`size` distinct problems, the same in every process for the same (task, size, seed)."""
    make = _task(task)
    rng = random.Random(f"copd-ray/{task}/heldout/{seed}")
    seen: dict[str, str] = {}
    while len(seen) < size:
        prompt, answer = make(rng)
        seen.setdefault(prompt, answer)
    return [
        PromptRecord(id=f"{task}-heldout-{i}", prompt=p, answer=a, capability=capability or task)
        for i, (p, a) in enumerate(seen.items())
    ]


def training_stream(
    task: str, heldout: list[PromptRecord], seed: int | str = 0, capability: str | None = None
) -> Iterator[PromptRecord]:
    """An endless stream of training problems that excludes the held-out prompts."""
    make = _task(task)
    excluded = {r.prompt for r in heldout}
    rng = random.Random(f"copd-ray/{task}/train/{seed}")
    i = 0
    while True:
        prompt, answer = make(rng)
        if prompt in excluded:
            continue
        yield PromptRecord(id=f"{task}-train-{i}", prompt=prompt, answer=answer, capability=capability or task)
        i += 1
