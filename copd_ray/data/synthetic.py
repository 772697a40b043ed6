"""Synthetic capabilities with verifiable answers.

Two arithmetic families that the tiny policy learns at different speeds (addition is
quick, multiplication slow), which is what makes their RL branches diverge, two visual
ones for the vision-language policy (`copd_ray.data.visual_tasks`), and two in English
for a real instruct model (`copd_ray.data.word_tasks`). Held-out
sets are fixed by a string seed (stable across processes, unlike `hash()`), and the
training stream never yields a held-out problem.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from copd_ray.data.records import PromptRecord
from copd_ray.data.visual_tasks import count_problem, motion_problem, pixels_key
from copd_ray.data.word_tasks import addsub_problem, times_problem


@dataclass
class Problem:
    prompt: str
    answer: str
    images: list[Any] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)

    @property
    def key(self) -> str:
        """What makes two problems the same: the prompt, and the pixels if any."""
        return _key(self)

    def record(self, id: str, capability: str) -> PromptRecord:
        return PromptRecord(id=id, prompt=self.prompt, answer=self.answer, capability=capability,
                            images=self.images, videos=self.videos)


def _add_problem(rng: random.Random) -> Problem:
    a, b = rng.randrange(1000), rng.randrange(1000)
    return Problem(f"{a:03d}+{b:03d}=", str(a + b))


def _mul_problem(rng: random.Random) -> Problem:
    a, b = rng.randrange(1000), rng.randrange(2, 10)
    return Problem(f"{a:03d}*{b}=", str(a * b))


TASKS: dict[str, Callable[[random.Random], Problem]] = {
    "add": _add_problem,
    "mul": _mul_problem,
    "count": lambda rng: Problem(**count_problem(rng)),
    "motion": lambda rng: Problem(**motion_problem(rng)),
    "word_addsub": lambda rng: Problem(**addsub_problem(rng)),
    "word_times": lambda rng: Problem(**times_problem(rng)),
}
VISUAL_TASKS = {"count", "motion"}


def _task(name: str) -> Callable[[random.Random], Problem]:
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]


def heldout_set(task: str, size: int, seed: int = 0, capability: str | None = None,
                split: str = "heldout", exclude: list[PromptRecord] = ()) -> list[PromptRecord]:
    """`size` distinct problems, the same in every process for the same (task, size, seed,
    split), none of them in `exclude` (a validation set excludes the held-out one)."""
    make = _task(task)
    rng = random.Random(f"copd-ray/{task}/{split}/{seed}")
    excluded = {_key(r) for r in exclude}
    seen: dict[str, Problem] = {}
    while len(seen) < size:
        problem = make(rng)
        if problem.key not in excluded:
            seen.setdefault(problem.key, problem)
    return [p.record(f"{task}-{split}-{i}", capability or task) for i, p in enumerate(seen.values())]


def training_stream(
    task: str, heldout: list[PromptRecord], seed: int | str = 0, capability: str | None = None
) -> Iterator[PromptRecord]:
    """An endless stream of training problems that excludes the `heldout` prompts (give
    the validation ones too, where there are any)."""
    make = _task(task)
    excluded = {_key(r) for r in heldout}
    rng = random.Random(f"copd-ray/{task}/train/{seed}")
    i = 0
    while True:
        problem = make(rng)
        if problem.key in excluded:
            continue
        yield problem.record(f"{task}-train-{i}", capability or task)
        i += 1


def _key(problem: Problem | PromptRecord) -> str:
    if not problem.images and not problem.videos:
        return problem.prompt
    return pixels_key(problem.prompt, problem.images, problem.videos)
