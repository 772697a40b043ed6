"""Learner: a policy and its optimizer, and the clipped update of one training step.

Plain torch, no Ray: the TrainerActor holds one (plus the groups, weight sync and
checkpoints), and a GPU check or a benchmark can drive the same step without a cluster.
A step is three parts, each testable alone: `old_logprobs` (what the update's ratios
compare with), `advantages` (each token's signal) and `update` (the clipped minibatches).

Memory stays bounded at any scale: rows go through the model in token-budget
micro-batches (gradients accumulated, the loss normalised by the whole minibatch),
only response positions are projected to the vocabulary and only a chunk of them at a
time, blocks may recompute their activations, and with more than one rank the policy
is sharded with FSDP2 (`copd_ray/sharding.py`).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from copd_ray import sharding
from copd_ray.algo import clip_fraction, grpo_advantages, opd_advantages, policy_loss, truncated_is_weight
from copd_ray.batch import SharedPrompts, TrainBatch, pack_microbatches, pad_rows, place, share_prompts
from copd_ray.config import GRPOConfig, TrainConfig
from copd_ray.models.loading import torch_dtype
from copd_ray.models.vl_inputs import pixel_kwargs, vision_token_ids
from copd_ray.policy_logprobs import PolicyLogprobs, check_output_layer
from copd_ray.step_data import Rollouts


@dataclass
class StepRows:
    """A rank's TrainBatch on the device, on the shifted grid (column t predicts token t + 1)."""

    batch: TrainBatch  # the rows as dealt; a one-row filler on a sharded rank dealt none
    real: int  # rows that train: len(batch), 0 for the filler
    ids: torch.Tensor  # [B, L] int64
    attention: torch.Tensor  # [B, L] int64
    targets: torch.Tensor  # [B, L-1] int64
    mask: torch.Tensor  # [B, L-1] float32: the response tokens that train (none of the filler's)
    where: torch.Tensor  # [B, L-1] bool, CPU: every row's response tokens (the filler's too)
    extra: dict  # a vision-language policy's [B, L] token types
    lengths: list[int]  # [B] each row's tokens
    temperature: torch.Tensor | None  # [B] each row's sampling temperature; None: all 1


@dataclass
class MicroBatch:
    """Rows of a StepRows that go through the model together, cut to their longest row
    when a token budget packs them."""

    rows: torch.Tensor  # [b] indices into the step's rows
    width: int  # w: tokens per row; the grid's columns are w - 1
    ids: torch.Tensor  # [b, w]
    attention: torch.Tensor  # [b, w]
    targets: torch.Tensor  # [b, w-1]
    mask: torch.Tensor  # [b, w-1]
    extra: dict  # these rows' token types and pixels
    shared: SharedPrompts | None  # each distinct prompt read once (train.share_prompts)
    temperature: torch.Tensor | None  # [b]

    def of(self, grid: torch.Tensor) -> torch.Tensor:
        """These rows' part of a step's [B, L-1] grid."""
        return grid[self.rows, : self.width - 1]


@dataclass
class OldLogprobs:
    """What the update's ratios and penalties compare with, on the step's [B, L-1] grid."""

    logprobs: torch.Tensor | None  # the policy's at the step's start; None: the update's first forward takes them
    own: torch.Tensor | None  # untempered old log-probs for the importance weight of tempered rows
    reference: torch.Tensor | None  # the reference policy's (grpo.kl_coef > 0)
    behaviour: torch.Tensor | None  # the generators' log-probs; None: no importance weight
    entropy: torch.Tensor | None  # [] summed over the no-gradient pass's tokens; None: not measured there


@dataclass
class Advantages:
    """Each token's signal: GRPO rows' group-normalised reward, and OPD rows' teacher log-probs,
    whose gap to the old log-probs (beta * (teacher - old)) each micro-batch takes (with one
    minibatch a step, its own forward gives the old log-probs)."""

    grpo: torch.Tensor  # [B, L-1] each GRPO row's normalised reward on its response tokens
    teacher: torch.Tensor  # [B, L-1] teacher log-probs on OPD rows' response tokens
    opd: torch.Tensor  # [B, 1] bool: the OPD rows
    beta: float

    def of(self, mb: MicroBatch, old: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A micro-batch's [b, w-1] advantages, given its old log-probs and its mask."""
        return torch.where(mb.of(self.opd.expand_as(self.grpo)),
                           opd_advantages(mb.of(self.teacher), old, self.beta) * mask, mb.of(self.grpo))


class Learner:
    """One rank of a branch's trainer. With `world_size` > 1 torch's default process
    group must already hold the branch's trainer ranks: the policy is sharded over them.

    Mixed precision: the weights and optimizer state stay float32 and forwards run in
    `dtype` (autocast on one rank, FSDP2's mixed precision when sharded). Pure bf16
    weights would drop every update smaller than 1/256 of the weight it lands on, which
    at RL learning rates is most of them.
    """

    def __init__(self, branch: str, rank: int, world_size: int, model_path: str, grpo: GRPOConfig,
                 dtype: str = "float32", trust_remote_code: bool = False, threads: int = 1,
                 device: str = "cpu", seed: int = 0, train: TrainConfig | None = None, beta: float = 1.0) -> None:
        from copd_ray.models import load_policy

        torch.set_num_threads(threads)
        torch.manual_seed(seed + rank)
        self.branch, self.rank, self.world_size, self.device = branch, rank, world_size, device
        self.grpo, self.train = grpo, train or TrainConfig()
        self.beta = beta  # the OPD coefficient of this branch as a student
        self.compute_dtype = torch_dtype(dtype)
        self.sharded = world_size > 1
        self.model, self.tokenizer = load_policy(model_path, "float32", trust_remote_code, self.device)
        self.model_path = model_path
        self.banned = tuple(vision_token_ids(self.model.config))  # never in a response (vision-language policies)
        self.forward = PolicyLogprobs(self.model, self.banned, self.train.logprob_chunk_tokens)
        check_output_layer(self.forward)
        # Reading each prompt once needs the model's KV cache in training: one rank (FSDP2
        # expects one forward of each block), no recomputed blocks (they drop the cache).
        self.share_prompts = self.train.share_prompts and not self.sharded and not self.train.gradient_checkpointing
        if self.train.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        if self.sharded:
            sharding.shard_policy(self.forward, self.model, device, self.compute_dtype)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=grpo.lr, weight_decay=grpo.weight_decay)
        self.reference = None
        if grpo.kl_coef > 0:
            reference, _ = load_policy(model_path, dtype, trust_remote_code, self.device)
            self.reference = PolicyLogprobs(reference.eval().requires_grad_(False), self.banned,
                                            self.train.logprob_chunk_tokens)
        self.rng = random.Random(f"copd-ray/trainer/{branch}/{seed}/{rank}")
        self.steps = 0

    def autocast(self):
        on = self.compute_dtype != torch.float32 and not self.sharded  # sharded: FSDP2 casts
        return torch.autocast(torch.device(self.device).type, self.compute_dtype, enabled=on)

    def bucket_tensors(self, plan: list, cast: bool = True) -> Iterator[list[torch.Tensor]]:
        """Each bucket's tensors (a plan of TensorSpecs, `actors/weight_sync.py`), whole and
        in the wire dtype, one bucket at a time: no rank
        ever holds a second whole copy of the model. Sharded, every rank must iterate
        (each tensor is an all-gather); only rank 0 sends. `cast=False` yields one rank's
        parameters themselves, uncast, for a sender whose copy into its buffer casts in the
        same pass; a shard is cast all the same, so that its gather moves the wire dtype."""
        state = self.model.state_dict()
        for bucket in plan:
            if cast or self.sharded:
                yield [sharding.full_tensor(state[s.name], torch_dtype(s.dtype))
                       for s in bucket]
            else:
                yield [state[s.name].detach() for s in bucket]

    # -- the step -------------------------------------------------------------------------

    def train_step(self, batch: TrainBatch) -> dict:
        """One training step: old log-probs, advantages, `grpo.minibatches` clipped updates."""
        start = time.perf_counter()
        step = self.step_rows(batch)
        old = self.old_logprobs(step)
        metrics = self.update(step, old, self.advantages(step))
        self.steps += 1
        return {**metrics, "seconds": time.perf_counter() - start}

    def step_rows(self, batch: TrainBatch) -> StepRows:
        """The batch padded onto the grid, on the device. GRPO rows train on the distribution
        they were sampled from, logits / grpo.temperature (as verl, OpenRLHF and TRL do: at
        T != 1 the raw log-probs' gradient points elsewhere and learns far slower); OPD rows
        on the student's own distribution, the one the teacher's log-probs are compared with."""
        real = len(batch)
        if not real:
            if not self.sharded:
                raise ValueError(f"branch {self.branch!r} rank {self.rank}: empty training batch")
            batch = TrainBatch(self._filler(), 0, batch.group_size, off_policy=batch.off_policy)  # in every collective
        ids, attention, targets, mask, extra = pad_rows(batch.rows, self.tokenizer.pad_token_id)
        where = mask.bool()
        if not real:
            mask.zero_()
        tau = self.grpo.temperature or 1.0  # greedy rollouts: the plain distribution
        temperature = None
        if tau != 1.0 and batch.grpo_rows:
            temperature = torch.ones(len(batch.rows), device=self.device)
            temperature[: batch.grpo_rows] = tau
        ids, attention, targets, mask = (t.to(self.device) for t in (ids, attention, targets, mask))
        return StepRows(batch, real, ids, attention, targets, mask, where,
                        {k: v.to(self.device) for k, v in extra.items()}, batch.rows.lengths.tolist(), temperature)

    def _filler(self) -> Rollouts:
        """A two-token row for a sharded rank whose share of the batch is empty."""
        t = self.tokenizer
        ids = [t.bos_token_id if t.bos_token_id is not None else t.pad_token_id, t.eos_token_id or t.pad_token_id]
        return Rollouts.pack([ids], [1], [[0.0]], [0.0], 0, 0, 0.0)

    def microbatch(self, step: StepRows, rows: list[int]) -> MicroBatch:
        """These rows' tensors; with a token budget, cut to their own longest row; laid out
        to read each prompt once where prompts repeat (train.share_prompts)."""
        idx = torch.tensor(rows, device=self.device)
        w = max(step.lengths[i] for i in rows) if self.train.max_tokens_per_microbatch else step.ids.shape[1]
        extra = {}
        if step.extra:  # these rows' token types and their pixels only
            extra = {"mm_token_type_ids": step.extra["mm_token_type_ids"][idx, :w],
                     **pixel_kwargs([step.batch.rows.prompts[i] for i in rows], self.device)}
        shared = (share_prompts(step.batch.rows.take(rows), self.tokenizer.pad_token_id, self.device)
                  if self.share_prompts else None)
        return MicroBatch(idx, w, step.ids[idx, :w], step.attention[idx, :w], step.targets[idx, : w - 1],
                          step.mask[idx, : w - 1], extra, shared,
                          step.temperature[idx] if step.temperature is not None else None)

    def logprobs(self, mb: MicroBatch, entropy: bool = False, own: bool = False, reference: bool = False):
        """(log-probs, entropy or None, own log-probs or None) of a micro-batch, [b, w-1]."""
        forward = self.reference if reference else self.forward
        return forward(mb.ids, mb.attention, mb.targets, mb.mask, mb.extra, mb.shared, entropy=entropy,
                       temperature=mb.temperature, own=own)

    def old_logprobs(self, step: StepRows) -> OldLogprobs:
        """The log-probs at the step's start. With one optimizer step a training step
        (grpo.minibatches=1) the update's own forward runs at the old weights, so its
        log-probs, detached, are the old ones exactly and no pass is needed here (TRL and verl
        skip it the same way). With more, a no-gradient pass takes them first, unless the
        rollouts' own log-probs are the trainer's (train.reuse_rollout_logprobs). The reference
        policy always needs a pass. The engines' log-probs are the models' own (untempered), so
        the importance weight compares own log-probs, and they cannot stand in for old ones."""
        fused, tempered = self.grpo.minibatches == 1, step.temperature is not None
        reuse = not fused and self.train.reuse_rollout_logprobs and not step.batch.off_policy and not tempered
        weigh = step.batch.off_policy and self.grpo.is_cap > 0
        behaviour = torch.zeros_like(step.mask)
        if step.real and (reuse or weigh):
            behaviour[: step.real] = place(step.batch.rows.logprobs, step.where).to(self.device)
        measure = not fused and not reuse
        old = OldLogprobs(
            logprobs=None if fused else behaviour * step.mask if reuse else torch.zeros_like(step.mask),
            own=torch.zeros_like(step.mask) if weigh and tempered and not fused else None,
            reference=torch.zeros_like(step.mask) if self.reference is not None else None,
            behaviour=behaviour if weigh else None,
            entropy=torch.zeros((), dtype=torch.float64, device=self.device) if measure else None)
        passes = pack_microbatches(list(range(len(step.lengths))), step.lengths, self.train.max_tokens_per_microbatch)
        n_passes = self._most(len(passes)) if measure or self.reference is not None else 0
        with torch.no_grad(), self.autocast():
            self.model.eval()
            for k in range(n_passes):  # a rank with fewer passes repeats its first (ranks stay in lockstep)
                mb = self.microbatch(step, passes[k] if k < len(passes) else passes[0])
                if measure:
                    lp, ent, own = self.logprobs(mb, entropy=True, own=old.own is not None)
                if k >= len(passes):
                    continue
                if measure:
                    old.logprobs[mb.rows, : mb.width - 1] = lp
                    old.entropy += (ent * mb.mask).sum()
                    if old.own is not None:
                        old.own[mb.rows, : mb.width - 1] = own
                if old.reference is not None:
                    old.reference[mb.rows, : mb.width - 1] = self.logprobs(mb, reference=True)[0]
            self.model.train()
        return old

    def advantages(self, step: StepRows) -> Advantages:
        """GRPO's group-normalised reward (a number per sequence, on each response token) and
        the OPD rows' teacher log-probs, placed on the grid."""
        b, n = step.batch, step.batch.grpo_rows
        grpo = torch.zeros_like(step.mask)
        if n:
            per_sequence = grpo_advantages(b.rows.rewards[:n].float(), b.group_size).to(self.device)
            grpo[:n] = per_sequence.unsqueeze(1) * step.mask[:n]
        opd = torch.zeros(len(step.lengths), 1, dtype=torch.bool, device=self.device)
        teacher = torch.zeros_like(step.mask)
        if step.real > n:
            opd[n : step.real] = True
            teacher[n : step.real] = place(b.teacher_logprobs, step.where[n : step.real]).to(self.device)
        return Advantages(grpo, teacher, opd, self.beta)

    def update(self, step: StepRows, old: OldLogprobs, adv: Advantages) -> dict:
        """`grpo.minibatches` optimizer steps over a shuffle of the rows. Each minibatch's loss
        is normalised by the whole minibatch, over every rank and micro-batch, so that the
        accumulated update equals one pass over all of it. The metrics stay on the device
        until the end of the step (one read, one reduction over the ranks)."""
        order = list(range(step.real))
        self.rng.shuffle(order)
        m = self.grpo.minibatches
        chunks = [order[i::m] for i in range(m)]
        budget = self.train.max_tokens_per_microbatch
        token_mean = self.grpo.loss_agg == "token_mean"
        sizes = (torch.stack([step.mask[ch].sum() for ch in chunks]).tolist() if token_mean
                 else [float(len(ch)) for ch in chunks])
        denominators = [max(d, 1.0) if token_mean else d for d in self._agree(sizes)]
        micro = [pack_microbatches(ch, step.lengths, budget) for ch in chunks]
        counts = [int(n) for n in self._agree([len(parts) for parts in micro], "max")]
        tally = torch.zeros(5, dtype=torch.float64, device=self.device)  # entropy, IS weight, truncated, -, -
        applied, norms, skipped = [], [], 0
        for parts, count, denominator in zip(micro, counts, denominators):
            if not count:
                continue  # no rows on any rank
            sums, norm = self._minibatch(step, old, adv, parts, count, denominator, tally)
            if not torch.isfinite(norm):  # a NaN/inf loss or gradient: every rank sees the same norm and skips
                skipped += 1
                self.optimizer.zero_grad(set_to_none=True)
                continue
            self.optimizer.step()
            applied.append(sums)
            norms.append(norm)
        return self._step_metrics(step, old, applied, norms, skipped, tally)

    def _minibatch(self, step: StepRows, old: OldLogprobs, adv: Advantages, parts: list[list[int]], count: int,
                   denominator: float, tally: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One minibatch's gradients accumulated over its micro-batches. Returns its
        [loss, clipped tokens, tokens] sums and the clipped gradient's norm (on the device)."""
        c, fused = self.grpo, old.logprobs is None
        whole = not self.sharded and not self.train.max_tokens_per_microbatch  # one micro-batch: the plain mean
        own_needed = old.behaviour is not None and step.temperature is not None
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        for k in range(count):
            filler = k >= len(parts)  # lockstep: a weightless pass on a row this rank has
            mb = self.microbatch(step, parts[k] if not filler else [0])
            with self.autocast():
                logprobs, ent, own = self.logprobs(mb, entropy=fused, own=fused and own_needed)
            before = logprobs.detach() if fused else mb.of(old.logprobs)
            if old.own is not None:
                own = mb.of(old.own)
            mask = mb.mask * (0.0 if filler else 1.0)
            weight = None
            if old.behaviour is not None:
                behaviour = mb.of(old.behaviour)
                own = before if own is None else own
                weight = truncated_is_weight(own, behaviour, c.is_cap) * mask
                tally[1] += weight.sum()
                tally[2] += ((own - behaviour > math.log(c.is_cap)) & (mask > 0)).sum()
            loss = policy_loss(logprobs, before, adv.of(mb, before, mask), mb.mask, c.clip_low, c.clip_high,
                               c.loss_agg, kl_coef=c.kl_coef,
                               ref_logprobs=mb.of(old.reference) if old.reference is not None else None,
                               denominator=None if whole else denominator, is_weight=weight)
            # FSDP2 averages gradients over the ranks; the loss is already the whole's share.
            (loss * (0.0 if filler else float(self.world_size))).backward()
            if not filler:
                tokens = mb.mask.sum()
                if fused:
                    tally[0] += (ent * mb.mask).sum()
                outside = clip_fraction(logprobs.detach(), before, mb.mask, c.clip_low, c.clip_high)
                sums += torch.stack([loss.detach(), outside * tokens, tokens]).double()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        return sums, norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _step_metrics(self, step: StepRows, old: OldLogprobs, applied: list[torch.Tensor], norms: list[torch.Tensor],
                      skipped: int, tally: torch.Tensor) -> dict:
        """The step's metrics, read from the device and summed over the ranks at once."""
        if old.entropy is not None:
            tally[0] += old.entropy
        tally[3], tally[4] = step.mask.sum(), step.real
        per_minibatch = torch.stack(applied) if applied else torch.zeros(0, 3, dtype=torch.float64,
                                                                         device=self.device)
        totals = self._agree(torch.cat([per_minibatch.flatten(), tally]).tolist())
        entropy_sum, weight_sum, truncated, tokens, sequences = totals[-5:]
        sums = [totals[3 * i : 3 * i + 3] for i in range(len(applied))]
        n = max(tokens, 1.0)
        reused = old.entropy is None and old.logprobs is not None
        weighed = old.behaviour is not None
        mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
        return {"loss": mean([s[0] for s in sums]), "clip_fraction": mean([s[1] / max(s[2], 1.0) for s in sums]),
                "grad_norm": mean(torch.stack(norms).tolist() if norms else []),
                "entropy": math.nan if reused else entropy_sum / n, "nan_skipped": skipped,
                "sequences": int(sequences), "is/weight_mean": weight_sum / n if weighed else 1.0,
                "is/truncated": truncated / n if weighed else 0.0}

    def _agree(self, values: list[float], op: str = "sum") -> list[float]:
        return sharding.all_reduce(values, op) if self.sharded else values

    def _most(self, n: int) -> int:
        return int(self._agree([n], "max")[0])
