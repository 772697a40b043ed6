"""A capability as the trainer sees it: training prompts, a fixed held-out set, a reward."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from copd_ray.config import CapabilityConfig
from copd_ray.data import DataError, LoadReport, PromptRecord, heldout_set, load_records, training_stream
from copd_ray.rewards import RewardFn, get_reward


@dataclass
class Capability:
    name: str
    reward_name: str
    reward: RewardFn
    template: str
    heldout: list[PromptRecord]
    train: Iterator[PromptRecord]
    reports: list[LoadReport] = field(default_factory=list)
    new_stream: Callable[[str], Iterator[PromptRecord]] | None = None
    chat_rows: int = 0  # rows whose prompt is a list of messages (they need a chat template)

    def sample(self, n: int) -> list[PromptRecord]:
        return [next(self.train) for _ in range(n)]

    def fork(self, salt: str) -> Capability:
        """The same capability with its own training stream (one per user, so that each
        stream's position alone says where a run is, and no two threads share one)."""
        return replace(self, train=self.new_stream(salt))


def _cycle_shuffled(records: list[PromptRecord], seed: str) -> Iterator[PromptRecord]:
    rng = random.Random(seed)
    order = list(records)
    while True:
        rng.shuffle(order)
        yield from order


def build_capability(cfg: CapabilityConfig, seed: int = 0) -> Capability:
    reward = get_reward(cfg.reward)
    reports: list[LoadReport] = []
    chat_rows = 0

    def load(source: str) -> list[PromptRecord]:
        nonlocal chat_rows
        records, report = load_records(source, cfg.name, cfg.prompt_key, cfg.answer_key, cfg.split)
        reports.append(report)
        if not records:
            raise DataError(f"capability {cfg.name!r}: no usable rows in {report}")
        chat_rows += sum(r.messages is not None for r in records)
        return records

    if cfg.source.startswith("synthetic:"):
        task = cfg.source.split(":", 1)[1]
        heldout = (
            load(cfg.heldout) if cfg.heldout else heldout_set(task, cfg.heldout_size, seed, capability=cfg.name)
        )
        def new_stream(salt: str) -> Iterator[PromptRecord]:
            return training_stream(task, heldout, f"{seed}{salt}", capability=cfg.name)
    else:
        records = load(cfg.source)
        if cfg.heldout:
            heldout = load(cfg.heldout)
            pool = records
        else:
            # Hold out a fixed, seeded slice of the source itself.
            shuffled = list(records)
            random.Random(f"copd-ray/{cfg.name}/split/{seed}").shuffle(shuffled)
            if len(shuffled) <= cfg.heldout_size:
                raise DataError(
                    f"capability {cfg.name!r}: {len(shuffled)} rows cannot spare {cfg.heldout_size} held out "
                    "(lower heldout_size or give a heldout dataset)"
                )
            heldout, pool = shuffled[: cfg.heldout_size], shuffled[cfg.heldout_size :]

        def new_stream(salt: str) -> Iterator[PromptRecord]:
            return _cycle_shuffled(pool, f"copd-ray/{cfg.name}/train/{seed}{salt}")
    return Capability(cfg.name, cfg.reward, reward, cfg.template, heldout, new_stream(""), reports, new_stream,
                      chat_rows)


def check_chat_template(caps: dict[str, Capability], tokenizer) -> None:
    """Chat rows need the tokenizer's chat template; checked once the tokenizer is known and
    before Ray starts, instead of failing the first rollout that draws one."""
    if getattr(tokenizer, "chat_template", None):
        return
    chat = [f"{name!r} ({c.chat_rows})" for name, c in caps.items() if c.chat_rows]
    if chat:
        raise DataError(f"capabilities {', '.join(chat)} have chat rows (a prompt given as messages), but the "
                        f"tokenizer of {getattr(tokenizer, 'name_or_path', None) or 'the policy'} has no chat "
                        "template: give those rows as a plain prompt, or use a model whose tokenizer has one")
