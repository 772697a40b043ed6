"""Held-out pass@1 (greedy) of a policy on a capability, through any rollout engine."""

from __future__ import annotations

from collections import Counter

from copd_ray.data import PromptRecord, encode_prompt
from copd_ray.engines import RolloutEngine, SamplingParams
from copd_ray.rewards import RewardFn


def evaluate(
    engine: RolloutEngine,
    tokenizer,
    records: list[PromptRecord],
    reward: RewardFn,
    template: str = "{prompt}",
    max_new_tokens: int = 8,
    vision=None,
) -> dict[str, float]:
    """`vision`: the VisionInputBuilder of a vision-language policy (None for a text one)."""
    prompts = [encode_prompt(r, tokenizer, template, vision) for r in records]
    samples = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens))
    texts = tokenizer.batch_decode([s.token_ids for s in samples], skip_special_tokens=True)
    rewards = [reward(text, r.answer) for text, r in zip(texts, records)]
    return {
        "pass_rate": sum(rewards) / len(rewards),
        "n": len(records),
        "mean_response_tokens": sum(len(s.token_ids) for s in samples) / len(samples),
    }


def pass_rates(engine: RolloutEngine, tokenizer, held: dict[str, list[PromptRecord]], cfg,
               vision=None) -> dict[str, float]:
    """Greedy held-out pass@1 on every capability of `cfg` (a Config): its records in `held`,
    its reward, template and eval.max_new_tokens."""
    from copd_ray.rewards import get_reward

    return {c.name: evaluate(engine, tokenizer, held[c.name], get_reward(c.reward), c.template,
                             cfg.eval.max_new_tokens, vision)["pass_rate"] for c in cfg.capabilities}


def guessing_rate(records: list[PromptRecord]) -> float:
    """The pass rate of a policy that ignores its input and always gives the most common
    answer: a rate at or below it says nothing about whether the policy reads its prompt
    (four of ten counting images may show four squares)."""
    answers = Counter(r.answer.strip() for r in records)
    return max(answers.values()) / len(records) if records else 0.0
