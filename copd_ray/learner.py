"""Learner: a policy and its optimizer, and the clipped update of one training step.

Plain torch, no Ray: the TrainerActor is this plus the groups, weight sync and
checkpoints, and a GPU check can drive the same step without a cluster.
"""

from __future__ import annotations

import math
import random
import time

import torch

from copd_ray.algo import clip_fraction, grpo_advantages, opd_advantages, policy_loss, token_entropy
from copd_ray.batch import TrainBatch, pad_sequences, place_per_token
from copd_ray.models.loading import DTYPES
from copd_ray.models.vl_inputs import ban_tokens, pixel_kwargs, vision_token_ids


def _token_logprobs(model, ids, attention, targets, extra, banned):
    """Log-probs of the targets, over the same distribution the engines sample from (a
    vision-language policy's vision tokens banned)."""
    logits = ban_tokens(model(input_ids=ids, attention_mask=attention, **extra).logits[:, :-1].float(), banned)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1), logits


class Learner:
    """One rank's policy. `dp_group` (a torch process group, set by the actor) averages
    gradients across the ranks of a data-parallel branch.

    Mixed precision: the weights and optimizer state stay float32 and forwards run under
    autocast in `dtype`. Pure bf16 weights would drop every update smaller than 1/256 of
    the weight it lands on, which at RL learning rates is most of them.
    """

    def __init__(self, branch: str, rank: int, world_size: int, model_path: str, grpo: dict,
                 dtype: str = "float32", trust_remote_code: bool = False, threads: int = 1,
                 device: str = "cpu", seed: int = 0) -> None:
        from copd_ray.models import load_policy

        torch.set_num_threads(threads)
        torch.manual_seed(seed + rank)
        self.branch, self.rank, self.world_size, self.device = branch, rank, world_size, device
        self.cfg = grpo
        self.compute_dtype = DTYPES[dtype]
        self.model, self.tokenizer = load_policy(model_path, "float32", trust_remote_code, self.device)
        self.model_path = model_path
        self.banned = vision_token_ids(self.model.config)  # never in a response (vision-language policies)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=grpo["lr"], weight_decay=grpo["weight_decay"])
        self.reference = None
        if grpo["kl_coef"] > 0:
            self.reference, _ = load_policy(model_path, dtype, trust_remote_code, self.device)
            self.reference.eval().requires_grad_(False)
        self.rng = random.Random(f"copd-ray/trainer/{branch}/{seed}/{rank}")
        self.dp_group = None
        self.steps = 0

    def autocast(self):
        return torch.autocast(torch.device(self.device).type, self.compute_dtype,
                              enabled=self.compute_dtype != torch.float32)

    def serving_state(self) -> dict[str, torch.Tensor]:
        """The weights as the generators and scorers hold them (in `dtype`)."""
        state = self.model.state_dict()
        if self.compute_dtype == torch.float32:
            return state
        cast: dict[tuple, torch.Tensor] = {}  # by storage, so tied weights stay one tensor
        for name, v in state.items():
            if v.is_floating_point():
                state[name] = cast.setdefault((v.data_ptr(), v.shape), v.to(self.compute_dtype))
        return state

    def train_step(self, batch: TrainBatch) -> dict:
        """One training step: old log-probs, advantages, `minibatches` clipped updates."""
        start = time.perf_counter()
        c = self.cfg
        sequences = batch.grpo_sequences + batch.opd_sequences
        plens = batch.grpo_prompt_lengths + batch.opd_prompt_lengths
        if not sequences:
            raise ValueError(f"branch {self.branch!r} rank {self.rank}: empty training batch")
        ids, attention, targets, mask, extra = pad_sequences(sequences, plens, self.tokenizer.pad_token_id)
        ids, attention, targets, mask = (t.to(self.device) for t in (ids, attention, targets, mask))
        extra = {k: v.to(self.device) for k, v in extra.items()}

        with torch.no_grad(), self.autocast():
            self.model.eval()
            old_logprobs, logits = _token_logprobs(self.model, ids, attention, targets, extra, self.banned)
            entropy = token_entropy(logits, mask).item()
            del logits
            ref_logprobs = (_token_logprobs(self.reference, ids, attention, targets, extra, self.banned)[0]
                            if self.reference is not None else None)
            self.model.train()

        n_grpo = len(batch.grpo_sequences)
        advantages = torch.zeros_like(old_logprobs)
        if n_grpo:
            seq_adv = grpo_advantages(torch.tensor(batch.grpo_rewards), batch.group_size).to(self.device)
            advantages[:n_grpo] = seq_adv.unsqueeze(1) * mask[:n_grpo]
        if batch.opd_sequences:
            teacher = place_per_token(batch.opd_teacher_logprobs, batch.opd_prompt_lengths, ids.shape[1]).to(self.device)
            beta = torch.tensor(batch.opd_beta, device=self.device).unsqueeze(1)
            advantages[n_grpo:] = opd_advantages(teacher, old_logprobs[n_grpo:], 1.0) * beta * mask[n_grpo:]

        order = list(range(len(sequences)))
        self.rng.shuffle(order)
        chunks = [order[i :: c["minibatches"]] for i in range(c["minibatches"])]
        losses, clips, norms, skipped = [], [], [], 0
        for chunk in (ch for ch in chunks if ch):
            idx = torch.tensor(chunk, device=self.device)
            part = {}
            if extra:  # this minibatch's rows: their token types and their pixels only
                part = {"mm_token_type_ids": extra["mm_token_type_ids"][idx],
                        **pixel_kwargs([sequences[i] for i in chunk], self.device)}
            with self.autocast():
                logprobs, _ = _token_logprobs(self.model, ids[idx], attention[idx], targets[idx], part, self.banned)
            loss = policy_loss(
                logprobs, old_logprobs[idx], advantages[idx], mask[idx], c["clip_low"], c["clip_high"], c["loss_agg"],
                ref_logprobs=ref_logprobs[idx] if ref_logprobs is not None else None, kl_coef=c["kl_coef"],
            )
            self.optimizer.zero_grad(set_to_none=True)
            finite = torch.isfinite(loss).to(torch.float32)
            if self.dp_group is not None:
                # Every rank must agree to step, or they would fall out of lockstep.
                self.dp_group.allreduce([finite]).wait()
            if finite.item() < (self.world_size if self.dp_group is not None else 1):
                skipped += 1  # a NaN/inf loss: skip this update, keep the run going
                continue
            loss.backward()
            self._all_reduce_gradients()
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c["grad_clip"])
            if not torch.isfinite(norm):
                skipped += 1
                self.optimizer.zero_grad(set_to_none=True)
                continue
            self.optimizer.step()
            losses.append(loss.item())
            norms.append(norm.item())
            clips.append(clip_fraction(logprobs.detach(), old_logprobs[idx], mask[idx], c["clip_low"], c["clip_high"]).item())
        self.steps += 1
        mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
        return {
            "loss": mean(losses), "clip_fraction": mean(clips), "grad_norm": mean(norms), "entropy": entropy,
            "nan_skipped": skipped, "sequences": len(sequences), "seconds": time.perf_counter() - start,
        }

    def _all_reduce_gradients(self) -> None:
        if self.dp_group is None:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.dp_group.allreduce([flat]).wait()
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
