"""Verifiable rewards, named by string in a config.

A reward is `fn(response: str, answer: str) -> float`. Besides the built-in names, a
config may name any importable function as "package.module:function".
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from copd_ray.rewards.math import math_reward
from copd_ray.rewards.simple import char_overlap, exact_match, multiple_choice

RewardFn = Callable[[str, str], float]

REWARDS: dict[str, RewardFn] = {
    "math": math_reward,
    "exact_match": exact_match,
    "multiple_choice": multiple_choice,
    "char_overlap": char_overlap,
}


def _check_signature(name: str, fn: Callable) -> None:
    """A reward that cannot take (response, answer) fails when the config is read, not in
    the first rollout after every actor is up."""
    try:
        signature = inspect.signature(fn)
    except ValueError:  # some builtins have none to read
        return
    try:
        signature.bind("response", "answer")
    except TypeError as e:
        raise ValueError(f"reward {name!r} must take (response, answer): {e}") from None


def get_reward(name: str) -> RewardFn:
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except Exception as e:  # anything the module itself raises, a SyntaxError included
            raise ValueError(f"reward {name!r} cannot be imported: {type(e).__name__}: {e}") from e
        if not callable(fn):
            raise ValueError(f"reward {name!r} is not callable")
        _check_signature(name, fn)
        return fn
    raise ValueError(f"unknown reward {name!r}; known: {sorted(REWARDS)} or 'module:function'")


__all__ = ["REWARDS", "RewardFn", "exact_match", "get_reward", "math_reward", "multiple_choice"]
