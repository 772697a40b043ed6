"""A capability as the trainer sees it: training prompts, a fixed held-out set, a reward."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from copd_ray.config import CapabilityConfig
from copd_ray.data import (DataError, LoadReport, PromptRecord, heldout_set, load_records, prompt_messages,
                           training_stream)
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
    validation: list[PromptRecord] = field(default_factory=list)

    @property
    def watched(self) -> list[PromptRecord]:
        """What evaluations during a run and the pair metrics read: the validation set, or
        the held-out one where there is none."""
        return self.validation or self.heldout

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


def with_system(record: PromptRecord, system: str | None, template: str) -> PromptRecord:
    """The record as chat messages led by `system` (the template applied to its prompt)."""
    if system is None:
        return record
    messages = [m for m in prompt_messages(record, template) if m["role"] != "system"]
    return replace(record, prompt=None, messages=[{"role": "system", "content": system}, *messages])


def _split_rows(cfg: CapabilityConfig, records: list[PromptRecord], seed: int):
    """(held-out, validation, training pool): fixed, seeded slices of one source."""
    shuffled = list(records)
    random.Random(f"copd-ray/{cfg.name}/split/{seed}").shuffle(shuffled)
    spared = cfg.heldout_size + cfg.validation_size
    if len(shuffled) <= spared:
        raise DataError(
            f"capability {cfg.name!r}: {len(shuffled)} rows cannot spare {spared} held out and for validation "
            "(lower heldout_size / validation_size or give a heldout dataset)"
        )
    return shuffled[: cfg.heldout_size], shuffled[cfg.heldout_size : spared], shuffled[spared:]


def build_capability(cfg: CapabilityConfig, seed: int = 0) -> Capability:
    reward = get_reward(cfg.reward)
    reports: list[LoadReport] = []

    def load(source: str) -> list[PromptRecord]:
        records, report = load_records(source, cfg.name, cfg.prompt_key, cfg.answer_key, cfg.split)
        reports.append(report)
        if not records:
            raise DataError(f"capability {cfg.name!r}: no usable rows in {report}")
        return records

    if cfg.source.startswith("synthetic:"):
        task = cfg.source.split(":", 1)[1]
        heldout = (
            load(cfg.heldout) if cfg.heldout else heldout_set(task, cfg.heldout_size, seed, capability=cfg.name)
        )
        validation = heldout_set(task, cfg.validation_size, seed, cfg.name, "validation", heldout) \
            if cfg.validation_size else []

        def new_stream(salt: str) -> Iterator[PromptRecord]:
            return training_stream(task, heldout + validation, f"{seed}{salt}", capability=cfg.name)
    else:
        records = load(cfg.source)
        if cfg.heldout:
            # Validation comes out of the source; the held-out set is the file given.
            heldout = load(cfg.heldout)
            _, validation, pool = _split_rows(cfg.model_copy(update={"heldout_size": 0}), records, seed)
        else:
            heldout, validation, pool = _split_rows(cfg, records, seed)

        def new_stream(salt: str) -> Iterator[PromptRecord]:
            return _cycle_shuffled(pool, f"copd-ray/{cfg.name}/train/{seed}{salt}")

    def framed(salt: str) -> Iterator[PromptRecord]:
        return (with_system(r, cfg.system, cfg.template) for r in new_stream(salt))

    heldout, validation = ([with_system(r, cfg.system, cfg.template) for r in rows] for rows in (heldout, validation))
    chat_rows = sum(r.messages is not None for r in heldout + validation)
    if not cfg.source.startswith("synthetic:"):
        chat_rows += sum(r.messages is not None for r in pool)
    return Capability(cfg.name, cfg.reward, reward, cfg.template, heldout, framed(""), reports, framed,
                      chat_rows, validation)


def check_chat_template(caps: dict[str, Capability], tokenizer) -> None:
    """Chat rows need the tokenizer's chat template; checked once the tokenizer is known and
    before Ray starts, instead of failing the first rollout that draws one."""
    if getattr(tokenizer, "chat_template", None):
        return
    chat = [f"{name!r} ({c.chat_rows})" for name, c in caps.items() if c.chat_rows]
    if chat:
        policy = getattr(tokenizer, "name_or_path", None) or "the policy"
        raise DataError(f"capabilities {', '.join(chat)} have chat rows (a prompt given as messages, or a "
                        f"system prompt), but the tokenizer of {policy} has no chat "
                        "template: give those rows as a plain prompt, or use a model whose tokenizer has one")
