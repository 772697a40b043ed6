"""The training batch a branch's trainer takes in one step, and its tensor form.

A step combines the native GRPO rollouts (rewards, in groups) with zero or more
cross-branch OPD rollouts (teacher log-probs per response token); both go through the
same clipped update. `assemble` builds it, in the trainer, from the step's Rollouts and
TeacherScores (`copd_ray/step_data.py`), and counts what the step spent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from copd_ray.models.vl_inputs import collate, token_ids
from copd_ray.step_data import Rollouts, StepSpec, TeacherScores


def _empty() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.float32)


@dataclass
class TrainBatch:
    """One trainer rank's rows of a step, packed: its GRPO rows (whole groups), then its OPD rows."""

    rows: Rollouts  # [B] GRPO rows then OPD rows: rewards of the GRPO rows, the generators' log-probs of every row
    grpo_rows: int = 0  # the first grpo_rows rows are GRPO's
    group_size: int = 1
    teacher_logprobs: torch.Tensor = field(default_factory=_empty)  # [R_opd] float32: each OPD response token's
    # Whether the rows came from another policy than the trainer's current one (then the loss
    # takes a truncated importance weight against the generators' log-probs).
    off_policy: bool = False

    def __len__(self) -> int:
        return len(self.rows)

    @staticmethod
    def of(group_size: int, grpo_sequences: list, grpo_prompt_lengths: list[int], grpo_rewards: list[float],
           opd_sequences: list = (), opd_prompt_lengths: list[int] = (), opd_teacher_logprobs: list = (),
           behaviour_logprobs: list | None = None, off_policy: bool = False) -> TrainBatch:
        """A hand-made batch from token-id lists (tests, benchmarks); behaviour log-probs 0 unless given."""
        sequences, plens = [*grpo_sequences, *opd_sequences], [*grpo_prompt_lengths, *opd_prompt_lengths]
        behaviour = behaviour_logprobs or [[0.0] * (len(token_ids(q)) - p) for q, p in zip(sequences, plens)]
        rows = Rollouts.pack(sequences, plens, behaviour, [*grpo_rewards, *[0.0] * len(opd_sequences)], 0, 0, 0.0)
        teacher = torch.tensor([x for row in opd_teacher_logprobs for x in row], dtype=torch.float32)
        return TrainBatch(rows, len(grpo_sequences), group_size, teacher, off_policy)

    def shard(self, rank: int, world: int) -> TrainBatch:
        """Whole GRPO groups and a slice of the OPD rows for one rank of a hand-made batch (a
        run's ranks get their rows dealt by the generators)."""
        groups, n = self.grpo_rows // self.group_size, len(self) - self.grpo_rows
        lo, hi = rank * groups // world * self.group_size, (rank + 1) * groups // world * self.group_size
        o_lo, o_hi = rank * n // world, (rank + 1) * n // world
        teacher = torch.split(self.teacher_logprobs, self.rows.response_lengths()[self.grpo_rows:].tolist())
        return TrainBatch(self.rows.take([*range(lo, hi), *range(self.grpo_rows + o_lo, self.grpo_rows + o_hi)]),
                          hi - lo, self.group_size, torch.cat([_empty(), *teacher[o_lo:o_hi]]), self.off_policy)


def assemble(spec: StepSpec, parts: tuple, trainer_steps: int) -> tuple[TrainBatch, dict]:
    """This rank's TrainBatch from its share of the step's inputs (laid out as `spec` says),
    and the tally of what the share held (`step_record` adds up every rank's): rewards,
    teacher versions, rollouts and teacher tokens spent, the behaviour policy's lag behind
    the trainer (`trainer_steps` optimizer steps so far)."""
    # Rewards are summed as Python floats in row order: one rank's means then equal, to the
    # last bit, those of the lists the records were once computed from.
    tally: dict = {"rows": 0, "teacher_tokens": 0}
    seconds = {"time/generate": 0.0, "time/score": 0.0}
    used: list[Rollouts] = []
    teacher = [_empty()]
    at = spec.native_parts
    if spec.native_parts:
        native = Rollouts.concat(list(parts[:at]))
        used.append(native)
        seconds["time/generate"] += native.seconds
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
        teacher.append(scores.logprobs)
        tally["teacher_tokens"] += len(scores.logprobs)
        t = f"opd/{edge.teacher}"
        tally.update({f"{t}/teacher_version": scores.version, f"{t}/rows": len(rollouts),
                      f"{t}/reward_sum": sum(rollouts.rewards.tolist()), f"{t}/tokens": len(scores.logprobs),
                      f"{t}/teacher_logp_sum": scores.logprobs.double().sum().item(),
                      f"{t}/student_logp_sum": rollouts.logprobs.double().sum().item()})
    behaviour_step = min(r.policy_step for r in used)
    off_policy = trainer_steps - behaviour_step > 0 or not spec.behaviour_exact
    batch = TrainBatch(Rollouts.concat(used), len(used[0]) if spec.native_parts else 0, spec.group_size,
                       torch.cat(teacher), off_policy)
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


def response_grid(rows: Rollouts, width: int) -> torch.Tensor:
    """[B, width - 1] bool: where each row's response tokens sit on the shifted grid. Position
    t predicts token t + 1, so response token j of a row with prompt length p sits at p - 1 + j."""
    columns = torch.arange(width - 1)
    return (columns >= rows.prompt_lengths[:, None] - 1) & (columns < rows.lengths[:, None] - 1)


def pad_rows(rows: Rollouts, pad_id: int):
    """(input_ids [B, L], attention_mask [B, L], targets [B, L-1], response_mask [B, L-1],
    extra forward kwargs) of packed rows (a vision-language policy's extras carry the pixels)."""
    if rows.prompts is not None:
        ids, attention, extra = collate(rows.sequences(), pad_id)
    else:
        attention = (torch.arange(int(rows.lengths.max())) < rows.lengths[:, None]).long()
        ids = torch.full(attention.shape, pad_id, dtype=torch.long).masked_scatter(attention.bool(), rows.tokens.long())
        extra = {}
    return ids, attention, ids[:, 1:], response_grid(rows, ids.shape[1]).float(), extra


def place(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Packed per-response-token values (row by row) at the grid positions `where` marks."""
    return torch.zeros(where.shape, dtype=torch.float32).masked_scatter(where, values.float())


def pad_tensors(rows: list[torch.Tensor], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, W] int64, mask [B, W]) of 1-D token tensors, padded on the right (or left)."""
    ids = torch.nn.utils.rnn.pad_sequence([r.long() for r in rows], batch_first=True, padding_value=pad_id,
                                          padding_side="left" if left else "right")
    lengths, columns = torch.tensor([len(r) for r in rows]), torch.arange(ids.shape[1])
    mask = columns >= ids.shape[1] - lengths[:, None] if left else columns < lengths[:, None]
    return ids, mask.long()


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


def share_prompts(rows: Rollouts, pad_id: int, device) -> SharedPrompts | None:
    """The layout of these rows, or None where it saves nothing (no prompt repeats) or does
    not apply (vision-language rows: their prompts carry pixels)."""
    if rows.prompts is not None:
        return None
    sequences, plens = torch.split(rows.tokens, rows.lengths.tolist()), rows.prompt_lengths.tolist()
    first: dict[bytes, int] = {}
    prompts, rows_of = [], []
    for seq, p in zip(sequences, plens):
        key = seq[:p].numpy().tobytes()
        if key not in first:
            first[key] = len(prompts)
            prompts.append(seq[:p])
        rows_of.append(first[key])
    if len(prompts) == len(sequences):
        return None
    prompt_ids, prompt_mask = pad_tensors(prompts, pad_id, left=True)
    pad = torch.tensor([pad_id], dtype=rows.tokens.dtype)
    response_ids, response_mask = pad_tensors([seq[p:] if len(seq) > p else pad for seq, p in zip(sequences, plens)],
                                              pad_id)
    response_mask[rows.lengths == rows.prompt_lengths] = 0  # no response: nothing of the row is scored
    return SharedPrompts(prompt_ids.to(device), prompt_mask.to(device), torch.tensor(rows_of, device=device),
                         response_ids.to(device), response_mask.to(device), (rows.prompt_lengths - 1).to(device))


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
