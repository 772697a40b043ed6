"""The data of one branch step, as it moves generator -> teacher scorer -> trainer.

Small typed records (shapes in the comments; N rollouts, R_i response tokens of rollout
i, P prompts, k top-k entries). The driver builds `PromptBatch`es and a `StepSpec`;
everything else is made by an actor and travels to the next one as a Ray object
reference, never through the driver. No Ray here: the records are plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

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
    """Samples of a slice of a PromptBatch, prompt by prompt (each prompt's samples together),
    packed: row i is its prompt then its response, tokens[starts[i] : starts[i] + lengths[i]]."""

    tokens: torch.Tensor  # [S] int32: every row's prompt + response, back to back (S = lengths.sum())
    lengths: torch.Tensor  # [N] int64: tokens of each row
    prompt_lengths: torch.Tensor  # [N] int64
    logprobs: torch.Tensor  # [R] float32: behaviour log-probs (the generator's) of every response token, row by row
    rewards: torch.Tensor  # [N] float64: the verifier's reward of each response
    version: int  # weight version the generator sampled with
    policy_step: int  # trainer optimizer steps those weights had taken
    seconds: float
    prompts: list | None = None  # [N] each row's VisualInputs prompt (its pictures) on a vision-language policy

    @staticmethod
    def pack(sequences: list, prompt_lengths: list[int], logprobs: list[list[float]], rewards: list[float],
             version: int, policy_step: int, seconds: float) -> Rollouts:
        """From token-id lists (or VisualInputs + response ids), as an engine returns them."""
        visual = bool(sequences) and not isinstance(sequences[0], (list, tuple))
        ids = [s.input_ids if visual else s for s in sequences]
        return Rollouts(
            torch.tensor([t for row in ids for t in row], dtype=torch.int32),
            torch.tensor([len(row) for row in ids], dtype=torch.int64),
            torch.tensor(prompt_lengths, dtype=torch.int64),
            torch.tensor([lp for row in logprobs for lp in row], dtype=torch.float32),
            torch.tensor(rewards, dtype=torch.float64), version, policy_step, seconds,
            [_prompt_part(s, p) for s, p in zip(sequences, prompt_lengths)] if visual else None)

    def __len__(self) -> int:
        return len(self.lengths)

    def response_lengths(self) -> torch.Tensor:
        return self.lengths - self.prompt_lengths  # [N]

    def per_row(self, values: torch.Tensor) -> list[list[float]]:
        """Packed per-response-token values (its log-probs, or a teacher's of it), a list per row."""
        return [v.tolist() for v in torch.split(values, self.response_lengths().tolist())]

    def sequences(self) -> list:
        """Each row as the engines take it: token ids, or a VisualInputs prompt + response ids."""
        rows = torch.split(self.tokens, self.lengths.tolist())
        if self.prompts is None:
            return [r.tolist() for r in rows]
        return [v + r[p:].tolist() for v, r, p in zip(self.prompts, rows, self.prompt_lengths.tolist())]

    def take(self, index: list[int]) -> Rollouts:
        """These rows, in this order: only their slices are cut (a micro-batch's rows cost
        that many, not the whole batch's)."""
        at = torch.tensor(index, dtype=torch.int64)

        def cut(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            ends, sizes = lengths.cumsum(0)[at].tolist(), lengths[at].tolist()
            return torch.cat([values[e - n : e] for e, n in zip(ends, sizes)]) if index else values[:0]

        return Rollouts(cut(self.tokens, self.lengths), self.lengths[at], self.prompt_lengths[at],
                        cut(self.logprobs, self.response_lengths()), self.rewards[at], self.version, self.policy_step,
                        self.seconds, [self.prompts[i] for i in index] if self.prompts is not None else None)

    def split(self, ranks: int, group: int) -> list[Rollouts]:
        """The rows dealt to `ranks` trainer ranks: whole groups of `group` rows (a GRPO
        group's advantages need all of it), each to the rank with the fewest tokens so far,
        longest first; within a rank in their order here."""
        if ranks == 1:
            return [self]
        tokens = self.lengths.view(-1, group).sum(1).tolist()
        share, load = [[] for _ in range(ranks)], [0] * ranks
        for g in sorted(range(len(tokens)), key=lambda g: -tokens[g]):
            r = load.index(min(load))
            share[r].append(g)
            load[r] += tokens[g]
        return [self.take([g * group + j for g in sorted(gs) for j in range(group)]) for gs in share]

    @staticmethod
    def concat(parts: list[Rollouts]) -> Rollouts:
        """Parts in order (a step's generators, prompt order); the oldest version is the batch's."""
        prompts = [v for p in parts for v in p.prompts] if parts[0].prompts is not None else None
        return Rollouts(*(torch.cat([getattr(p, f) for p in parts])
                          for f in ("tokens", "lengths", "prompt_lengths", "logprobs", "rewards")),
                        min(p.version for p in parts), min(p.policy_step for p in parts),
                        max(p.seconds for p in parts), prompts)


def one_per_rank(values: list):
    """What an actor method called with `.options(num_returns=len(values))` returns: Ray takes
    a list for several returns and the value itself for one."""
    return values if len(values) > 1 else values[0]


def _prompt_part(sequence, prompt_length: int):
    """The VisualInputs prompt of a sampled row (its pictures; the response ids are packed)."""
    return replace(sequence, input_ids=sequence.input_ids[:prompt_length],
                   token_types=sequence.token_types[:prompt_length])


@dataclass
class TeacherScores:
    """A teacher's log-probs of a student's rollouts (the OPD signal's log pi_j)."""

    logprobs: torch.Tensor  # [R] float32: of every response token of the rollouts scored, row by row
    version: int  # the teacher's weight version when it scored
    seconds: float

    @staticmethod
    def of(scores) -> TeacherScores:
        """An engine's Scores (a list of log-probs per row), packed."""
        return TeacherScores(torch.tensor([lp for row in scores.logprobs for lp in row], dtype=torch.float32),
                             scores.version, scores.extra["seconds"])

    def cut(self, parts: list[Rollouts], ranks: int) -> list[TeacherScores]:
        """Scores of the concatenated `parts` (G generators' shares for `ranks` ranks,
        generator-major) back into one TeacherScores per rank, in that rank's part order."""
        pieces = torch.split(self.logprobs, [int(p.response_lengths().sum()) for p in parts])
        return [TeacherScores(torch.cat(pieces[r::ranks]), self.version, self.seconds) for r in range(ranks)]


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
