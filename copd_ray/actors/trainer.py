"""TrainerActor: a branch's policy and optimizer; one rank of its data-parallel group.

Each step it recomputes the old log-probs, builds the GRPO and OPD advantages with
`copd_ray.algo`, and takes the clipped update; rank 0 then broadcasts the weights.
"""

from __future__ import annotations

import datetime
import math
import os
import random
import shutil
import time
from pathlib import Path

import ray
import torch

from copd_ray.actors.batch import TrainBatch, pad_sequences, place_per_token
from copd_ray.actors.weight_sync import WeightGroup, bucket_plan, host_store
from copd_ray.algo import clip_fraction, grpo_advantages, opd_advantages, policy_loss, token_entropy
from copd_ray.models.loading import copy_processor_files
from copd_ray.models.vl_inputs import ban_tokens, pixel_kwargs, vision_token_ids


def _token_logprobs(model, ids, attention, targets, extra, banned):
    """Log-probs of the targets, over the same distribution the engines sample from (a
    vision-language policy's vision tokens banned)."""
    logits = ban_tokens(model(input_ids=ids, attention_mask=attention, **extra).logits[:, :-1].float(), banned)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1), logits


@ray.remote
class TrainerActor:
    def __init__(self, branch: str, rank: int, world_size: int, model_path: str, grpo: dict,
                 dtype: str = "float32", trust_remote_code: bool = False, threads: int = 1,
                 gpus: float = 0.0, seed: int = 0) -> None:
        from copd_ray.models import load_policy

        torch.set_num_threads(threads)
        torch.manual_seed(seed + rank)
        self.branch, self.rank, self.world_size = branch, rank, world_size
        self.device = "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
        self.cfg = grpo
        self.model, self.tokenizer = load_policy(model_path, dtype, trust_remote_code, self.device)
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
        self.weight_group: WeightGroup | None = None
        self.steps = 0

    def ready(self) -> dict:
        return {"branch": self.branch, "rank": self.rank, "pid": os.getpid()}

    # -- groups -------------------------------------------------------------------------

    def dp_address(self) -> tuple[str, int]:
        """Rank 0 hosts the rendezvous store of the data-parallel group."""
        self._store, host, port = host_store(self.world_size)
        return host, port

    def join_dp_group(self, host: str, port: int) -> None:
        # A standalone process group, not the default one: the weight-sync collective
        # group on rank 0 already owns torch's default group.
        if self.rank != 0:
            self._store = torch.distributed.TCPStore(host, port, self.world_size, is_master=False,
                                                     timeout=datetime.timedelta(seconds=120))
        store = torch.distributed.PrefixStore(f"copd-dp-{self.branch}", self._store)
        timeout = datetime.timedelta(seconds=600)
        if self.device == "cuda":
            self.dp_group = torch.distributed.ProcessGroupNCCL(store, self.rank, self.world_size)
        else:
            self.dp_group = torch.distributed.ProcessGroupGloo(store, self.rank, self.world_size, timeout)

    def weight_store(self, world_size: int) -> tuple[str, int]:
        """Host the rendezvous of a standalone weight-sync group (transport "torch")."""
        self._weight_store, host, port = host_store(world_size)
        return host, port

    def join_weight_group(self, name: str, world_size: int, rank: int, backend: str, transport: str = "ray",
                          address: tuple[str, int] | None = None) -> int:
        store = getattr(self, "_weight_store", None) if transport == "torch" else None
        self.weight_group = WeightGroup(name, world_size, rank, backend, transport, address, store=store)
        return rank

    # -- training -----------------------------------------------------------------------

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

        with torch.no_grad():
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

    # -- weights ------------------------------------------------------------------------

    def weight_plan(self, bucket_mb: float) -> list:
        return bucket_plan(self.model.state_dict(), int(bucket_mb * 2**20))

    def send_weights(self, plan: list) -> dict:
        start = time.perf_counter()
        sent = self.weight_group.send(self.model.state_dict(), plan)
        return {"bytes": sent, "seconds": time.perf_counter() - start}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    # -- checkpoints ----------------------------------------------------------------------

    def save(self, folder: str, with_optimizer: bool = True) -> str:
        """The policy as a Hugging Face folder (plus optimizer state), written to a
        temporary sibling and renamed into place, so a crash never leaves half a folder."""
        final = Path(folder)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        copy_processor_files(self.model_path, tmp)
        if with_optimizer:
            torch.save({"optimizer": self.optimizer.state_dict(), "rng": self.rng.getstate(), "steps": self.steps},
                       tmp / "trainer_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return str(final)

    def load(self, folder: str) -> int:
        from safetensors.torch import load_file

        state = load_file(str(Path(folder) / "model.safetensors"))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or any("lm_head" not in m for m in missing):
            raise RuntimeError(f"checkpoint {folder} does not fit the model: missing {missing}, unexpected {unexpected}")
        extra = torch.load(Path(folder) / "trainer_state.pt", weights_only=False)
        self.optimizer.load_state_dict(extra["optimizer"])
        self.rng.setstate(extra["rng"])
        self.steps = extra["steps"]
        return self.steps
