"""The rollout-engine interface that generators and scorers hold.

Every implementation (pure torch here; vLLM and SGLang beside it) takes prompts as
token ids, returns the sampled tokens with the policy's log-probs of them, scores given
sequences teacher-forced, and takes new weights in place with a version number.

Log-probs are always the model's own: log_softmax of the raw logits, before temperature
or top-p reshape the sampling distribution. So a sample's log-probs equal what a
teacher-forced forward pass of the same sequence gives, and the trainer's own log-probs
and a teacher's scores are on the same scale. (GRPO's update itself trains on logits /
temperature, the distribution sampled from; its importance weights compare own log-probs.)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from copd_ray.models.vl_inputs import token_ids


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 16
    top_k_logprobs: int = 0  # also return the k most likely tokens at each step
    stop_token_ids: tuple[int, ...] = ()  # besides eos, which always stops
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Sample:
    """One response to one prompt."""

    prompt_index: int
    token_ids: list[int]  # the response, including the stop token if one was emitted
    logprobs: list[float]  # log p(token_ids[t] | prompt, token_ids[:t])
    finish_reason: Literal["stop", "length"]
    top_k_ids: list[list[int]] | None = None
    top_k_logprobs: list[list[float]] | None = None


@dataclass
class Scores:
    """Teacher-forced log-probs of each sequence's response tokens."""

    logprobs: list[list[float]]
    version: int
    top_k_ids: list[list[list[int]]] | None = None
    top_k_logprobs: list[list[list[float]]] | None = None
    extra: dict = field(default_factory=dict)


def require_token_ids(prompts: Sequence, engine: str) -> None:
    """An engine that takes token ids only (SGLang) says so instead of failing somewhere inside."""
    if any(not isinstance(p, (list, tuple)) for p in prompts):
        raise NotImplementedError(f"the {engine} engine takes token-id prompts only; images and videos need "
                                  "engine.kind=hf or vllm")


def check_score_request(
    sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int], vocab_size: int
) -> None:
    """Reject what no engine can score, naming the offending sequence."""
    if len(sequences) != len(prompt_lengths):
        raise ValueError(f"{len(sequences)} sequences but {len(prompt_lengths)} prompt lengths")
    for i, (seq, p) in enumerate(zip(sequences, prompt_lengths)):
        if not 1 <= p <= len(seq):
            raise ValueError(f"sequence {i}: prompt length {p} outside [1, {len(seq)}]")
        bad = [t for t in token_ids(seq) if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"sequence {i}: token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")


class RolloutEngine(ABC):
    version: int = 0

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Sample]:
        """`params.n` samples per prompt, grouped: prompt 0's n samples first, then prompt 1's."""

    @abstractmethod
    def score(
        self, sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int], top_k: int = 0
    ) -> Scores:
        """log p(seq[p + t] | seq[:p + t]) for every response token of every sequence."""

    @abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load new weights in place and hold `version` from then on."""
