"""The training batch a branch's trainer takes in one step, and its tensor form.

A step combines the native GRPO rollouts (rewards, in groups) with zero or more
cross-branch OPD rollouts (teacher log-probs per response token); both go through the
same clipped update. `assemble` builds it, in the trainer, from the step's Rollouts and
TeacherScores (`copd_ray/step_data.py`), and counts what the step spent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from copd_ray.models.vl_inputs import VisualInputs, collate
from copd_ray.step_data import Rollouts, StepSpec, TeacherScores


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
    # The generators' log-probs of every response token, GRPO rows then OPD rows, and
    # whether they came from another policy than the trainer's current one (then the
    # loss takes a truncated importance weight).
    behaviour_logprobs: list[list[float]] = field(default_factory=list)
    off_policy: bool = False

    def __len__(self) -> int:
        return len(self.grpo_sequences) + len(self.opd_sequences)

    def shard(self, rank: int, world: int) -> TrainBatch:
        """Whole GRPO groups and a slice of the OPD rows for one trainer rank."""
        groups = len(self.grpo_sequences) // self.group_size
        g_lo, g_hi = rank * groups // world, (rank + 1) * groups // world
        lo, hi = g_lo * self.group_size, g_hi * self.group_size
        n = len(self.opd_sequences)
        o_lo, o_hi = rank * n // world, (rank + 1) * n // world
        g = len(self.grpo_sequences)
        behaviour = self.behaviour_logprobs[lo:hi] + self.behaviour_logprobs[g + o_lo : g + o_hi]
        return TrainBatch(
            self.group_size, self.grpo_sequences[lo:hi], self.grpo_prompt_lengths[lo:hi], self.grpo_rewards[lo:hi],
            self.opd_sequences[o_lo:o_hi], self.opd_prompt_lengths[o_lo:o_hi],
            self.opd_teacher_logprobs[o_lo:o_hi], self.opd_beta[o_lo:o_hi], behaviour, self.off_policy,
        )


def assemble(spec: StepSpec, parts: tuple, trainer_steps: int) -> tuple[TrainBatch, dict]:
    """This rank's TrainBatch from its share of the step's inputs (laid out as `spec` says),
    and the tally of what the share held (`step_record` adds up every rank's): rewards,
    teacher versions, rollouts and teacher tokens spent, the behaviour policy's lag behind
    the trainer (`trainer_steps` optimizer steps so far)."""
    batch = TrainBatch(group_size=spec.group_size)
    # Rewards are summed as Python floats in row order: one rank's means then equal, to the
    # last bit, those of the lists the records were once computed from.
    tally: dict = {"rows": 0, "teacher_tokens": 0}
    seconds = {"time/generate": 0.0, "time/score": 0.0}
    used: list[Rollouts] = []
    at = spec.native_parts
    if spec.native_parts:
        native = Rollouts.concat(list(parts[:at]))
        used.append(native)
        seconds["time/generate"] += native.seconds
        batch.grpo_sequences, batch.grpo_prompt_lengths = native.sequences(), native.prompt_lengths.tolist()
        batch.grpo_rewards = native.rewards.tolist()
        tally.update({"native/rows": len(native), "native/reward_sum": sum(native.rewards.tolist()),
                      "native/passes": int((native.rewards >= 1.0).sum()),
                      "native/response_tokens": int(native.response_lengths().sum())})
    for edge in spec.edges:
        rollouts = Rollouts.concat(list(parts[at : at + edge.parts]))
        scores: TeacherScores = parts[at + edge.parts]
        at += edge.parts + 1
        used.append(rollouts)
        seconds["time/generate"] += rollouts.seconds
        seconds["time/score"] += scores.seconds
        batch.opd_sequences += rollouts.sequences()
        batch.opd_prompt_lengths += rollouts.prompt_lengths.tolist()
        batch.opd_teacher_logprobs += rollouts.per_row(scores.logprobs)
        batch.opd_beta += [edge.beta] * len(rollouts)
        tally["teacher_tokens"] += len(scores.logprobs)
        t = f"opd/{edge.teacher}"
        tally.update({f"{t}/teacher_version": scores.version, f"{t}/rows": len(rollouts),
                      f"{t}/reward_sum": sum(rollouts.rewards.tolist()), f"{t}/tokens": len(scores.logprobs),
                      f"{t}/teacher_logp_sum": scores.logprobs.double().sum().item(),
                      f"{t}/student_logp_sum": rollouts.logprobs.double().sum().item()})
    batch.behaviour_logprobs = [lp for r in used for lp in r.per_row(r.logprobs)]
    behaviour_step = min(r.policy_step for r in used)
    batch.off_policy = trainer_steps - behaviour_step > 0 or not spec.behaviour_exact
    tally.update({"rows": len(batch), "behaviour_version": min(r.version for r in used),
                  "behaviour_lag": trainer_steps - behaviour_step, **seconds})
    return batch, tally


def step_record(spec: StepSpec, tallies: list[dict]) -> dict:
    """The step's record from every rank's tally (`assemble`): means over the whole batch."""
    total = {k: sum(t.get(k, 0) for t in tallies) for k in tallies[0]}
    record: dict = {"kind": "step", "step": spec.step, "phase": spec.phase, "opd_batches": len(spec.edges),
                    "teacher_tokens": total["teacher_tokens"]}
    if spec.native_parts:
        rows = max(total["native/rows"], 1)
        record.update(reward_mean=total["native/reward_sum"] / rows, pass_rate=total["native/passes"] / rows,
                      response_length=total["native/response_tokens"] / rows)
    for edge in spec.edges:
        t = f"opd/{edge.teacher}"
        record.update({
            f"{t}/teacher_version": min(x[f"{t}/teacher_version"] for x in tallies),
            f"{t}/reward_mean": total[f"{t}/reward_sum"] / max(total[f"{t}/rows"], 1),
            f"{t}/logp_gap": (total[f"{t}/teacher_logp_sum"] - total[f"{t}/student_logp_sum"])
            / max(total[f"{t}/tokens"], 1)})
    record.update({"rollouts": total["rows"], "lag/behaviour_version": min(x["behaviour_version"] for x in tallies),
                   "lag/trainer_version": spec.trainer_version, "lag/steps": max(x["behaviour_lag"] for x in tallies),
                   **{k: max(x[k] for x in tallies) for k in ("time/generate", "time/score")}})
    return record


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


@dataclass
class SharedPrompts:
    """A micro-batch laid out so that each distinct prompt is read once (a GRPO group's
    samples share theirs): the prompts, then every row's response on its prompt's KV cache."""

    prompt_ids: torch.Tensor  # [U, P] the distinct prompts, left-padded
    prompt_mask: torch.Tensor  # [U, P]
    rows_of: torch.Tensor  # [b] each row's prompt, an index into the U
    response_ids: torch.Tensor  # [b, R] each row's response, right-padded
    response_mask: torch.Tensor  # [b, R]
    offsets: torch.Tensor  # [b] p - 1: the shifted-grid column of each row's first response token


def share_prompts(sequences: list, prompt_lengths: list[int], pad_id: int, device) -> SharedPrompts | None:
    """The layout of these rows, or None where it saves nothing (no prompt repeats) or does
    not apply (vision-language rows: their prompts carry pixels)."""
    if any(isinstance(s, VisualInputs) for s in sequences):
        return None
    first: dict[tuple, int] = {}
    rows_of = [first.setdefault(tuple(s[:p]), len(first)) for s, p in zip(sequences, prompt_lengths)]
    if len(first) == len(sequences):
        return None
    prompt_ids, prompt_mask, _ = collate([list(p) for p in first], pad_id, left=True, device=device)
    response_ids, response_mask, _ = collate([s[p:] or [pad_id] for s, p in zip(sequences, prompt_lengths)], pad_id,
                                             device=device)
    for i, (s, p) in enumerate(zip(sequences, prompt_lengths)):
        if len(s) == p:  # no response: nothing of the row is scored
            response_mask[i] = 0
    return SharedPrompts(prompt_ids, prompt_mask, torch.tensor(rows_of, device=device), response_ids, response_mask,
                         torch.tensor([p - 1 for p in prompt_lengths], device=device))


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
