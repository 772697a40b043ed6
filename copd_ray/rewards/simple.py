"""Rewards that need no math: exact match, multiple-choice letters, and a shaped one."""

from __future__ import annotations

import re

from copd_ray.rewards.extract import final_answer

_CHOICE = re.compile(r"\(?\b([A-J])\b\)?")


def _normalise(text: str) -> str:
    return " ".join(text.strip().split()).rstrip(".").lower()


def exact_match(response: str, answer: str) -> float:
    """1.0 when the whole response, or its final answer, equals `answer` (whitespace,
    case and a trailing period ignored)."""
    target = _normalise(answer)
    if _normalise(response) == target:
        return 1.0
    extracted = final_answer(response)
    return 1.0 if extracted is not None and _normalise(extracted) == target else 0.0


def choice_letter(response: str) -> str | None:
    """The chosen option letter: from the final answer if there is one, else the last
    standalone capital A-J in the response."""
    extracted = final_answer(response)
    for text in ([extracted] if extracted else []) + [response]:
        letters = _CHOICE.findall(text)
        if letters:
            return letters[-1]
    return None


def multiple_choice(response: str, answer: str) -> float:
    """1.0 when the chosen letter is the answer's letter."""
    letter = choice_letter(response)
    return 1.0 if letter is not None and letter == answer.strip().strip("()").upper() else 0.0


def char_overlap(response: str, answer: str) -> float:
    """Share of the answer's distinct characters that the response contains: partial
    credit that an untrained policy already earns, so that GRPO has a signal from the
    first step (smoke tests and reproducibility checks on a fresh tiny model)."""
    wanted = set(answer.strip())
    return len(wanted & set(response)) / len(wanted) if wanted else 0.0
