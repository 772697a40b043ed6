"""Learner: a policy and its optimizer, and the clipped update of one training step.

Plain torch, no Ray: the TrainerActor is this plus the groups, weight sync and
checkpoints, and a GPU check or a benchmark can drive the same step without a cluster.

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

import torch
from torch import nn

from copd_ray import sharding
from copd_ray.algo import (chosen_logprobs, clip_fraction, grpo_advantages, opd_advantages, policy_loss,
                           truncated_is_weight)
from copd_ray.batch import SharedPrompts, TrainBatch, pack_microbatches, pad_rows, place, share_prompts
from copd_ray.models.loading import torch_dtype
from copd_ray.models.vl_inputs import pixel_kwargs, vision_token_ids
from copd_ray.step_data import Rollouts

TRAIN_DEFAULTS = {"gradient_checkpointing": False, "max_tokens_per_microbatch": None, "logprob_chunk_tokens": 2048,
                  "reuse_rollout_logprobs": False, "share_prompts": True}


class PolicyLogprobs(nn.Module):
    """The policy's forward as training needs it: log-probs (and entropy) of the response
    tokens, laid out on the shifted [B, L-1] grid (zeros elsewhere). One module, so that
    FSDP2 gathers the root's parameters (output layer, embeddings) around all of it."""

    def __init__(self, policy: nn.Module, banned: tuple[int, ...], chunk: int) -> None:
        super().__init__()
        self.policy, self.banned, self.chunk = policy, banned, chunk

    def forward(self, ids, attention, targets, mask, extra: dict, shared: SharedPrompts | None = None,
                entropy: bool = False, temperature: torch.Tensor | None = None, own: bool = False):
        """(log-probs, entropy or None, own log-probs or None) on the grid; `temperature`
        [B] per row (see `chosen_logprobs`)."""
        backbone = getattr(self.policy, self.policy.base_model_prefix)
        if shared is not None:
            return self._on_shared_prompts(backbone, shared, mask.shape[1], entropy, temperature, own)
        hidden = backbone(input_ids=ids, attention_mask=attention, use_cache=False, **extra).last_hidden_state[:, :-1]
        where = mask > 0
        tau = temperature.unsqueeze(1).expand(where.shape)[where] if temperature is not None else None
        out = chosen_logprobs(self.policy.get_output_embeddings(), hidden[where], targets[where], self.chunk,
                              self.banned, entropy, tau, own)

        def grid(v):
            return torch.zeros(where.shape, dtype=v.dtype, device=v.device).masked_scatter(where, v)

        return tuple(grid(v) if v is not None else None for v in out)

    def _on_shared_prompts(self, backbone, shared: SharedPrompts, width: int, entropy: bool,
                           temperature: torch.Tensor | None, own: bool):
        """Each distinct prompt through the model once, then every row's response on a copy
        of its prompt's KV cache (gradients flow back through the copies into the prompt's
        one pass), as the engine samples them: the same log-probs for less compute."""
        rows, pmask = shared.rows_of, shared.prompt_mask
        prompt = backbone(input_ids=shared.prompt_ids, attention_mask=pmask,
                          position_ids=(pmask.cumsum(1) - 1).clamp(min=0), use_cache=True)
        cache = prompt.past_key_values
        cache.batch_select_indices(rows)
        r = shared.response_ids.shape[1]
        positions = pmask.sum(1)[rows].unsqueeze(1) + torch.arange(r, device=pmask.device)
        attention = torch.cat([pmask[rows], shared.response_mask], 1)
        response = backbone(input_ids=shared.response_ids, attention_mask=attention, position_ids=positions,
                            past_key_values=cache, use_cache=True).last_hidden_state
        # Response token t is predicted by the hidden state before it: the prompt's last for t = 0.
        hidden = torch.cat([prompt.last_hidden_state[rows, -1:], response[:, :-1]], 1)
        where = shared.response_mask > 0
        tau = temperature.unsqueeze(1).expand(where.shape)[where] if temperature is not None else None
        out = chosen_logprobs(self.policy.get_output_embeddings(), hidden[where], shared.response_ids[where],
                              self.chunk, self.banned, entropy, tau, own)
        # Onto the shifted [b, width] grid: response token t of row i sits at column offsets[i] + t.
        columns = shared.offsets.unsqueeze(1) + torch.arange(r, device=pmask.device)

        def grid(v):
            dense = torch.zeros(where.shape, dtype=v.dtype, device=v.device).masked_scatter(where, v)
            wide = torch.zeros(len(rows), width + r, dtype=v.dtype, device=v.device)
            return wide.scatter(1, columns, dense)[:, :width]

        return tuple(grid(v) if v is not None else None for v in out)


@torch.no_grad()
def _check_output_layer(forward: PolicyLogprobs) -> None:
    """The chunked pass takes logits to be the output layer applied to the last hidden
    state, as in Llama and Qwen models; a model that scales or caps its logits would
    train on other numbers than it samples from, so it is refused here."""
    policy = forward.policy
    ids = torch.tensor([[1, 2, 3]], device=policy.device) % policy.config.get_text_config().vocab_size
    backbone = getattr(policy, policy.base_model_prefix)
    direct = policy(input_ids=ids).logits.float()
    via_head = policy.get_output_embeddings()(backbone(input_ids=ids).last_hidden_state).float()
    if not torch.allclose(direct, via_head, atol=1e-4, rtol=1e-4):
        raise ValueError(f"{type(policy).__name__}: its logits are not its output layer applied to the last hidden "
                         "state (scaled or capped logits), which the trainer's chunked log-probs assume")


class Learner:
    """One rank of a branch's trainer. With `world_size` > 1 torch's default process
    group must already hold the branch's trainer ranks: the policy is sharded over them.

    Mixed precision: the weights and optimizer state stay float32 and forwards run in
    `dtype` (autocast on one rank, FSDP2's mixed precision when sharded). Pure bf16
    weights would drop every update smaller than 1/256 of the weight it lands on, which
    at RL learning rates is most of them.
    """

    def __init__(self, branch: str, rank: int, world_size: int, model_path: str, grpo: dict,
                 dtype: str = "float32", trust_remote_code: bool = False, threads: int = 1,
                 device: str = "cpu", seed: int = 0, train: dict | None = None, beta: float = 1.0) -> None:
        from copd_ray.models import load_policy

        torch.set_num_threads(threads)
        torch.manual_seed(seed + rank)
        self.branch, self.rank, self.world_size, self.device = branch, rank, world_size, device
        self.cfg, self.train_cfg = grpo, {**TRAIN_DEFAULTS, **(train or {})}
        self.beta = beta  # the OPD coefficient of this branch as a student
        self.compute_dtype = torch_dtype(dtype)
        self.sharded = world_size > 1
        self.model, self.tokenizer = load_policy(model_path, "float32", trust_remote_code, self.device)
        self.model_path = model_path
        self.banned = tuple(vision_token_ids(self.model.config))  # never in a response (vision-language policies)
        self.forward = PolicyLogprobs(self.model, self.banned, self.train_cfg["logprob_chunk_tokens"])
        _check_output_layer(self.forward)
        # Reading each prompt once needs the model's KV cache in training: one rank (FSDP2
        # expects one forward of each block), no recomputed blocks (they drop the cache).
        self.share_prompts = (self.train_cfg["share_prompts"] and not self.sharded
                              and not self.train_cfg["gradient_checkpointing"])
        if self.train_cfg["gradient_checkpointing"]:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        if self.sharded:
            sharding.shard_policy(self.forward, self.model, device, self.compute_dtype)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=grpo["lr"], weight_decay=grpo["weight_decay"])
        self.reference = None
        if grpo["kl_coef"] > 0:
            reference, _ = load_policy(model_path, dtype, trust_remote_code, self.device)
            self.reference = PolicyLogprobs(reference.eval().requires_grad_(False), self.banned,
                                            self.train_cfg["logprob_chunk_tokens"])
        self.rng = random.Random(f"copd-ray/trainer/{branch}/{seed}/{rank}")
        self.steps = 0

    def autocast(self):
        on = self.compute_dtype != torch.float32 and not self.sharded  # sharded: FSDP2 casts
        return torch.autocast(torch.device(self.device).type, self.compute_dtype, enabled=on)

    # -- weights as generators and scorers hold them ---------------------------------------

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

    def _filler(self) -> Rollouts:
        """A two-token row for a sharded rank whose share of the batch is empty."""
        t = self.tokenizer
        ids = [t.bos_token_id if t.bos_token_id is not None else t.pad_token_id, t.eos_token_id or t.pad_token_id]
        return Rollouts.pack([ids], [1], [[0.0]], [0.0], 0, 0, 0.0)

    def _rows(self, rows, tensors, data: Rollouts, lengths: list[int], trim: bool):
        """A micro-batch's tensors; with a token budget, cut to its own longest row; laid out
        to read each prompt once where prompts repeat (train.share_prompts)."""
        ids, attention, targets, mask, extra = tensors
        idx = torch.tensor(rows, device=self.device)
        w = max(lengths[i] for i in rows) if trim else ids.shape[1]
        part = {}
        if extra:  # these rows' token types and their pixels only
            part = {"mm_token_type_ids": extra["mm_token_type_ids"][idx, :w],
                    **pixel_kwargs([data.prompts[i] for i in rows], self.device)}
        shared = share_prompts(data.take(rows), self.tokenizer.pad_token_id, self.device) if self.share_prompts else None
        return idx, w, (ids[idx, :w], attention[idx, :w], targets[idx, : w - 1], mask[idx, : w - 1], part, shared)

    def _agree(self, values: list[float], op: str = "sum") -> list[float]:
        return sharding.all_reduce(values, op) if self.sharded else values

    def train_step(self, batch: TrainBatch) -> dict:
        """One training step: old log-probs, advantages, `minibatches` clipped updates."""
        start = time.perf_counter()
        c, budget = self.cfg, self.train_cfg["max_tokens_per_microbatch"]
        data, real = batch.rows, len(batch)
        if not real:
            if not self.sharded:
                raise ValueError(f"branch {self.branch!r} rank {self.rank}: empty training batch")
            data = self._filler()  # still takes part in every collective
        ids, attention, targets, mask, extra = pad_rows(data, self.tokenizer.pad_token_id)
        where = mask.bool()  # every response token's place on the grid, row by row
        if not real:
            mask.zero_()
        tensors = tuple(t.to(self.device) for t in (ids, attention, targets, mask)) + (
            {k: v.to(self.device) for k, v in extra.items()},)
        mask = tensors[3]
        lengths = data.lengths.tolist()
        trim = budget is not None

        # Old log-probs. With one optimizer step a training step (grpo.minibatches=1) the update's
        # own forward runs at the old weights, so its log-probs, detached, are the old ones
        # exactly and no extra pass is needed (TRL and verl skip it the same way). With more
        # minibatches a no-gradient pass takes them first, unless the rollouts' own log-probs are
        # the trainer's (train.reuse_rollout_logprobs). The reference policy always needs a pass.
        fused = c["minibatches"] == 1
        # GRPO rows train on the distribution they were sampled from, logits / grpo.temperature
        # (as verl, OpenRLHF and TRL do: at T != 1 the raw log-probs' gradient points elsewhere
        # and learns far slower); OPD rows on the student's own distribution, the one the
        # teacher's log-probs are compared with. The engines' log-probs are the models' own, so
        # the importance weight compares own log-probs, and they cannot stand in for old ones.
        n_grpo = batch.grpo_rows
        tau = c.get("temperature", 1.0) or 1.0  # greedy rollouts: the plain distribution
        tempered = tau != 1.0 and n_grpo > 0
        temps = torch.ones(mask.shape[0], device=self.device)
        temps[:n_grpo] = tau
        reuse = (not fused and self.train_cfg["reuse_rollout_logprobs"] and not batch.off_policy
                 and not tempered)
        weigh = batch.off_policy and c["is_cap"] > 0
        own_old = torch.zeros_like(mask) if weigh and tempered else None  # old own log-probs, for the weight
        behaviour = torch.zeros_like(mask)  # the generators' log-probs, where they are used
        if real and (reuse or weigh):
            behaviour[:real] = place(data.logprobs, where).to(self.device)
        old_logprobs = behaviour * mask if reuse else torch.zeros_like(mask)
        ref_logprobs = torch.zeros_like(mask) if self.reference is not None else None
        measure_old = not fused and not reuse
        entropy_sum = 0.0
        passes = pack_microbatches(list(range(len(data))), lengths, budget)
        n_passes = int(self._agree([len(passes)], "max")[0]) if measure_old or self.reference is not None else 0
        with torch.no_grad(), self.autocast():
            self.model.eval()
            for k in range(n_passes):  # a rank with fewer passes repeats its first (ranks stay in lockstep)
                rows = passes[k] if k < len(passes) else passes[0]
                idx, w, mb = self._rows(rows, tensors, data, lengths, trim)
                t = temps[idx] if tempered else None
                if measure_old:
                    lp, ent, own = self.forward(*mb, entropy=True, temperature=t, own=own_old is not None)
                if k < len(passes):
                    if measure_old:
                        old_logprobs[idx, : w - 1] = lp
                        entropy_sum += (ent * mb[3]).sum().item()
                        if own_old is not None:
                            own_old[idx, : w - 1] = own
                    if self.reference is not None:
                        ref_logprobs[idx, : w - 1] = self.reference(*mb, temperature=t)[0]
            self.model.train()

        # The per-token signals, computed per micro-batch from its old log-probs: GRPO's
        # group-normalised reward (a number per sequence), OPD's teacher - old log-prob gap.
        grpo_adv = torch.zeros_like(mask)
        if n_grpo:
            seq_adv = grpo_advantages(data.rewards[:n_grpo].float(), batch.group_size).to(self.device)
            grpo_adv[:n_grpo] = seq_adv.unsqueeze(1) * mask[:n_grpo]
        opd_row = torch.zeros(mask.shape[0], 1, dtype=torch.bool, device=self.device)
        teacher = torch.zeros_like(mask)
        if real > n_grpo:
            opd_row[n_grpo:real] = True
            teacher[n_grpo:real] = place(batch.teacher_logprobs, where[n_grpo:real]).to(self.device)
        is_sums = [0.0, 0.0]  # importance weights, truncated tokens

        def signals(idx, w, old, own, m):
            adv = torch.where(opd_row[idx], opd_advantages(teacher[idx, : w - 1], old, self.beta) * m,
                              grpo_adv[idx, : w - 1])
            if not weigh:
                return adv, None
            own = old if own is None else own
            weight = truncated_is_weight(own, behaviour[idx, : w - 1], c["is_cap"]) * m
            is_sums[0] += weight.sum().item()
            is_sums[1] += ((own - behaviour[idx, : w - 1] > math.log(c["is_cap"])) & (m > 0)).sum().item()
            return adv, weight

        order = list(range(real))
        self.rng.shuffle(order)
        chunks = [order[i :: c["minibatches"]] for i in range(c["minibatches"])]
        # Each minibatch's loss is normalised by the whole minibatch, over every rank and
        # micro-batch, so that the accumulated update equals one pass over all of it.
        token_mean = c["loss_agg"] == "token_mean"
        sizes = [mask[ch].sum().item() if token_mean else float(len(ch)) for ch in chunks]
        denominators = self._agree(sizes)
        if token_mean:
            denominators = [max(d, 1.0) for d in denominators]
        micro = [pack_microbatches(ch, lengths, budget) for ch in chunks]
        counts = [int(n) for n in self._agree([len(m) for m in micro], "max")]
        whole = not self.sharded and budget is None  # one rank, one micro-batch: the plain mean
        losses, clips, norms, skipped = [], [], [], 0
        for j, parts in enumerate(micro):
            if not counts[j]:
                continue  # no rows on any rank
            self.optimizer.zero_grad(set_to_none=True)
            stats = [0.0, 0.0, 0.0]  # loss, clipped tokens, tokens
            for k in range(counts[j]):
                filler = k >= len(parts)  # lockstep: a weightless pass on a row this rank has
                idx, w, mb = self._rows(parts[k] if not filler else [0], tensors, data, lengths, trim)
                with self.autocast():
                    logprobs, ent, own = self.forward(*mb, entropy=fused, temperature=temps[idx] if tempered else None,
                                                      own=fused and own_old is not None)
                old = logprobs.detach() if fused else old_logprobs[idx, : w - 1]
                if own_old is not None and not fused:
                    own = own_old[idx, : w - 1]
                advantages, is_weight = signals(idx, w, old, own, mb[3] * (0.0 if filler else 1.0))
                loss = policy_loss(
                    logprobs, old, advantages, mb[3], c["clip_low"], c["clip_high"], c["loss_agg"],
                    kl_coef=c["kl_coef"], ref_logprobs=ref_logprobs[idx, : w - 1] if ref_logprobs is not None else None,
                    denominator=None if whole else denominators[j], is_weight=is_weight,
                )
                # FSDP2 averages gradients over the ranks; the loss is already the whole's share.
                (loss * (0.0 if filler else float(self.world_size))).backward()
                if not filler:
                    tokens = mb[3].sum().item()
                    if fused:
                        entropy_sum += (ent * mb[3]).sum().item()
                    stats[0] += loss.item()
                    outside = clip_fraction(logprobs.detach(), old, mb[3], c["clip_low"], c["clip_high"])
                    stats[1] += outside.item() * tokens
                    stats[2] += tokens
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c["grad_clip"])
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            if not torch.isfinite(norm):  # a NaN/inf loss or gradient: every rank sees the same norm and skips
                skipped += 1
                self.optimizer.zero_grad(set_to_none=True)
                continue
            self.optimizer.step()
            loss_sum, clipped, tokens = self._agree(stats)
            losses.append(loss_sum)
            norms.append(norm.item())
            clips.append(clipped / max(tokens, 1.0))
        entropy_sum, token_count, weight_sum, truncated = self._agree([entropy_sum, mask.sum().item(), *is_sums])
        entropy = math.nan if reuse else entropy_sum / max(token_count, 1.0)
        n = max(token_count, 1.0)
        is_stats = ({"is/weight_mean": weight_sum / n, "is/truncated": truncated / n} if weigh
                    else {"is/weight_mean": 1.0, "is/truncated": 0.0})
        self.steps += 1
        mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
        return {
            "loss": mean(losses), "clip_fraction": mean(clips), "grad_norm": mean(norms), "entropy": entropy,
            "nan_skipped": skipped, "sequences": int(self._agree([float(real)])[0]),
            "seconds": time.perf_counter() - start, **is_stats,
        }
