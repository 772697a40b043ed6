"""The training batch a branch's trainer takes in one step, and its tensor form.

A step combines the native GRPO rollouts (rewards, in groups) with zero or more
cross-branch OPD rollouts (teacher log-probs per response token); both go through the
same clipped update.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from copd_ray.models.vl_inputs import collate


@dataclass
class TrainBatch:
    group_size: int = 1
    grpo_sequences: list[list[int]] = field(default_factory=list)  # prompt + response ids
    grpo_prompt_lengths: list[int] = field(default_factory=list)
    grpo_rewards: list[float] = field(default_factory=list)
    opd_sequences: list[list[int]] = field(default_factory=list)
    opd_prompt_lengths: list[int] = field(default_factory=list)
    opd_teacher_logprobs: list[list[float]] = field(default_factory=list)  # per response token
    opd_beta: list[float] = field(default_factory=list)  # per sequence (its teacher edge's beta)

    def __len__(self) -> int:
        return len(self.grpo_sequences) + len(self.opd_sequences)

    def shard(self, rank: int, world: int) -> TrainBatch:
        """Whole GRPO groups and a slice of the OPD rows for one trainer rank."""
        groups = len(self.grpo_sequences) // self.group_size
        g_lo, g_hi = rank * groups // world, (rank + 1) * groups // world
        lo, hi = g_lo * self.group_size, g_hi * self.group_size
        n = len(self.opd_sequences)
        o_lo, o_hi = rank * n // world, (rank + 1) * n // world
        return TrainBatch(
            self.group_size, self.grpo_sequences[lo:hi], self.grpo_prompt_lengths[lo:hi], self.grpo_rewards[lo:hi],
            self.opd_sequences[o_lo:o_hi], self.opd_prompt_lengths[o_lo:o_hi],
            self.opd_teacher_logprobs[o_lo:o_hi], self.opd_beta[o_lo:o_hi],
        )


def pad_sequences(sequences: list, prompt_lengths: list[int], pad_id: int):
    """(input_ids [B, L], attention_mask [B, L], targets [B, L-1], response_mask [B, L-1],
    extra forward kwargs) of token-id lists or VisualInputs (whose extras carry the pixels).

    Position t of the shifted arrays predicts token t + 1, so response token j of a
    sequence with prompt length p sits at shifted position p - 1 + j.
    """
    ids, attention, extra = collate(sequences, pad_id)
    response = torch.zeros((len(sequences), ids.shape[1] - 1), dtype=torch.float32)
    for i, (seq, p) in enumerate(zip(sequences, prompt_lengths)):
        response[i, p - 1 : len(seq) - 1] = 1.0
    return ids, attention, ids[:, 1:], response, extra


def place_per_token(values: list[list[float]], prompt_lengths: list[int], width: int) -> torch.Tensor:
    """Per-response-token values laid out on the shifted [B, L-1] grid."""
    out = torch.zeros((len(values), width - 1))
    for i, (row, p) in enumerate(zip(values, prompt_lengths)):
        out[i, p - 1 : p - 1 + len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def pack_microbatches(rows: list[int], lengths: list[int], max_tokens: int | None) -> list[list[int]]:
    """Rows (indices into `lengths`) in micro-batches whose padded size, rows x longest
    row, stays within `max_tokens` (a row longer than that is a micro-batch alone).
    Longest first, so rows of similar length share a micro-batch and little is padding.
    None: all rows in one micro-batch, in the order given."""
    if max_tokens is None:
        return [list(rows)] if rows else []
    out: list[list[int]] = []
    for i in sorted(rows, key=lambda i: -lengths[i]):
        if out and lengths[out[-1][0]] * (len(out[-1]) + 1) <= max_tokens:
            out[-1].append(i)  # the first row of a micro-batch is its longest
        else:
            out.append([i])
    return out
