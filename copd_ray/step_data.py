"""The data of one branch step, as it moves generator -> teacher scorer -> trainer.

Small typed records (shapes in the comments; N rollouts, R_i response tokens of rollout
i, P prompts, k top-k entries). The driver builds `PromptBatch`es and a `StepSpec`;
everything else is made by an actor and travels to the next one as a Ray object
reference, never through the driver. No Ray here: the records are plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from copd_ray.engines import SamplingParams


@dataclass
class PromptBatch:
    """Prompts of one batch of a step (the native GRPO batch, or one teacher's OPD batch)."""

    prompts: list  # [P] token ids, or VisualInputs of a vision-language policy
    answers: list[str]  # [P] reference answers, for the verifiers
    rewards: list[str]  # [P] reward names
    params: SamplingParams  # params.n samples per prompt, temperature, seed

    def slice(self, lo: int, hi: int) -> PromptBatch:
        return PromptBatch(self.prompts[lo:hi], self.answers[lo:hi], self.rewards[lo:hi], self.params)


@dataclass
class StepPrompts:
    """What the driver draws for one branch's step."""

    step: int
    phase: str  # "rl" or "opd"
    native: PromptBatch | None  # from D_k, rewarded by r_k (None in Phase II with opd.native_rl=false)
    teachers: dict[str, tuple[object, PromptBatch]]  # teacher j -> (j's scorer endpoint, prompts from D_j)


@dataclass
class Rollouts:
    """One generator's samples of a slice of a PromptBatch, prompt by prompt."""

    sequences: list  # [N] prompt + response (token ids, or VisualInputs + response ids)
    prompt_lengths: list[int]  # [N]
    logprobs: list[list[float]]  # [N][R_i] behaviour log-probs: the generator's, of each response token
    rewards: list[float]  # [N] the verifier's reward of each response
    version: int  # weight version the generator sampled with
    policy_step: int  # trainer optimizer steps those weights had taken
    seconds: float

    @staticmethod
    def concat(parts: list[Rollouts]) -> Rollouts:
        """The generators' parts in prompt order; the oldest version is the batch's."""
        return Rollouts([s for p in parts for s in p.sequences], [n for p in parts for n in p.prompt_lengths],
                        [lp for p in parts for lp in p.logprobs], [r for p in parts for r in p.rewards],
                        min(p.version for p in parts), min(p.policy_step for p in parts),
                        max(p.seconds for p in parts))

    def response_lengths(self) -> list[int]:
        return [len(lp) for lp in self.logprobs]


@dataclass
class TeacherScores:
    """A teacher's log-probs of a student's rollouts (the OPD signal's log pi_j)."""

    logprobs: list[list[float]]  # [N][R_i]
    version: int  # the teacher's weight version when it scored
    seconds: float


@dataclass
class TopK:
    """A scorer's k most likely tokens at every response position of some rollouts."""

    ids: torch.Tensor  # [N, T, k] int64, most likely first (T: the longest response)
    logprobs: torch.Tensor  # [N, T, k] float32
    mask: torch.Tensor  # [N, T] 1.0 at real response positions


@dataclass
class OPDEdge:
    teacher: str
    parts: int  # Rollouts refs of this edge among the step's inputs
    beta: float  # the student's OPD coefficient


@dataclass
class StepSpec:
    """What a trainer needs to read a step's inputs: Rollouts refs of the native batch
    (`native_parts` of them), then per OPD edge its Rollouts refs and one TeacherScores."""

    step: int
    phase: str  # "rl" or "opd"
    group_size: int  # GRPO group size of the native batch
    native_parts: int
    edges: list[OPDEdge] = field(default_factory=list)
    trainer_version: int = 0  # the version the trainer's current weights will be published as
    behaviour_exact: bool = True  # the generators compute exactly as the trainer does (hf, float32)
