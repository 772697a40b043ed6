"""TrainerActor: one rank of a branch's trainer group, holding its Learner (policy,
optimizer, the clipped update); rank 0 also broadcasts the weights and writes checkpoints.

With more than one rank, torch's default process group is the branch's trainer ranks
and the policy is sharded over them (FSDP2); the Learner is built once that group
exists. The weight-sync group is then a standalone one (`WeightGroup`, transport "torch").
"""

from __future__ import annotations

import datetime
import os
import pickle
import re
import shutil
import time
import uuid
from pathlib import Path

import ray
import torch

from copd_ray import sharding
from copd_ray.actors.weight_sync import WeightGroup, bucket_plan, host_store
from copd_ray.batch import assemble
from copd_ray.config import GRPOConfig, TrainConfig
from copd_ray.errors import CheckpointError
from copd_ray.learner import Learner
from copd_ray.models.loading import actor_device, copy_processor_files
from copd_ray.step_data import StepSpec


@ray.remote
class TrainerActor:
    def __init__(self, branch: str, rank: int, world_size: int, model_path: str, grpo: GRPOConfig,
                 dtype: str = "float32", trust_remote_code: bool = False, threads: int = 1,
                 gpus: float = 0.0, seed: int = 0, train: TrainConfig | None = None, beta: float = 1.0) -> None:
        device = actor_device(gpus)
        self._learner_args = (branch, rank, world_size, model_path, grpo, dtype, trust_remote_code, threads, device,
                              seed, train, beta)
        self.branch, self.rank, self.world_size, self.device = branch, rank, world_size, device
        # Sharded, the Learner comes with the ranks' group (join_dp_group).
        self.learner: Learner | None = Learner(*self._learner_args) if world_size == 1 else None
        self.weight_group: WeightGroup | None = None
        # New in every process Ray (re)starts: the driver tells a restarted actor by it.
        self.incarnation = uuid.uuid4().hex

    def ready(self) -> dict:
        return {"branch": self.branch, "rank": self.rank, "pid": os.getpid(), "incarnation": self.incarnation,
                "node": ray.get_runtime_context().get_node_id()}

    def reload(self, *args, **kwargs) -> dict:
        """Become a rank of another run (`WarmPool`) in this process, whose imports are done:
        its old Learner is dropped before the new one loads. The incarnation stays: it names
        the process, which Ray did not restart."""
        incarnation, self.learner = self.incarnation, None
        self.__init__(*args, **kwargs)
        self.incarnation = incarnation
        return self.ready()

    def reset(self) -> None:
        """Back to the start of the run (weights from model_path, fresh optimizer and
        shuffling), keeping the groups: a rollback to before the first checkpoint."""
        self.learner = None
        self.learner = Learner(*self._learner_args)

    # -- groups -------------------------------------------------------------------------

    def dp_address(self, timeout_s: float = 600.0) -> tuple[str, int]:
        """Rank 0 hosts the rendezvous store of the trainer ranks' group."""
        self._store, host, port = host_store(self.world_size, timeout_s)
        return host, port

    def join_dp_group(self, host: str, port: int, generation: int = 0, timeout_s: float = 600.0) -> None:
        """Make torch's default process group the branch's trainer ranks and build the
        sharded Learner on it (from model_path: after a rank restarts, the driver reloads
        the last checkpoint into every rank)."""
        timeout = datetime.timedelta(seconds=timeout_s)
        if self.rank != 0:
            self._store = torch.distributed.TCPStore(host, port, self.world_size, is_master=False, timeout=timeout)
        if torch.distributed.is_initialized():  # a rebuilt group: the old one lost a member
            torch.distributed.destroy_process_group()
        self.learner = None
        torch.distributed.init_process_group(
            "nccl" if self.device == "cuda" else "gloo", store=torch.distributed.PrefixStore(
                f"copd-dp-{self.branch}-{generation}", self._store),
            rank=self.rank, world_size=self.world_size, timeout=timeout)
        self.learner = Learner(*self._learner_args)

    def dp_ready(self) -> bool:
        """Whether this rank holds a sharded Learner (a restarted rank does not)."""
        return self.learner is not None

    def weight_store(self, world_size: int, timeout_s: float = 120.0) -> tuple[str, int]:
        """Host the rendezvous of a standalone weight-sync group (transport "torch")."""
        self._weight_store, host, port = host_store(world_size, timeout_s)
        return host, port

    def join_weight_group(self, name: str, world_size: int, rank: int, backend: str, transport: str = "ray",
                          address: tuple[str, int] | None = None, timeout_s: float = 120.0) -> int:
        store = getattr(self, "_weight_store", None) if transport == "torch" else None
        self.weight_group = WeightGroup(name, world_size, rank, backend, transport, address, store=store,
                                        timeout_s=timeout_s)
        return rank

    # -- the step -----------------------------------------------------------------------

    def train_on(self, spec: StepSpec, *parts) -> dict:
        """One step on this rank's share of the rollouts and teacher scores, laid out as `spec`
        says (Ray hands them over by reference from the generators and scorers, which dealt
        them to the ranks). Returns {"train": this rank's update metrics, "tally": what its
        share held} (only numbers: the driver gets this and nothing else)."""
        batch, tally = assemble(spec, parts, self.learner.steps)
        return {"train": self.learner.train_step(batch), "tally": tally}

    # -- weights ------------------------------------------------------------------------

    def weight_plan(self, bucket_mb: float) -> list:
        return bucket_plan(self.learner.model.state_dict(), int(bucket_mb * 2**20), self.learner.compute_dtype)

    def send_weights(self, plan: list) -> dict:
        """Rank 0 broadcasts; on a sharded branch every rank is called, to gather each bucket."""
        start = time.perf_counter()
        buckets = self.learner.bucket_tensors(plan, cast=False)  # the send casts while copying into its buffer
        if self.rank == 0:
            sent = self.weight_group.send(plan, buckets)
        else:  # a sharded rank: its gathered buckets are in the wire dtype
            sent = sum(sum(t.numel() * t.element_size() for t in tensors) for tensors in buckets)
        return {"bytes": sent, "seconds": time.perf_counter() - start}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole float32 weights on CPU (sharded: every rank calls, rank 0 gets them)."""
        if self.learner.sharded:
            return sharding.full_model_state(self.learner.model)
        return {k: v.detach().cpu() for k, v in self.learner.model.state_dict().items()}

    # -- checkpoints ----------------------------------------------------------------------

    def save(self, folder: str, with_optimizer: bool = True) -> str:
        """The policy as a Hugging Face folder (plus optimizer state), written to a
        temporary sibling and renamed into place, so a crash never leaves half a folder.
        Sharded, every rank is called: the whole weights and optimizer state are gathered
        to rank 0's CPU, which writes them (so any number of ranks can resume them)."""
        final, learner = Path(folder), self.learner
        weights, optimizer, rngs = None, None, [learner.rng.getstate()]
        if learner.sharded:
            weights = sharding.full_model_state(learner.model, tied_once=True)
            optimizer = sharding.full_optimizer_state(learner.model, learner.optimizer) if with_optimizer else None
            rngs = [None] * self.world_size
            torch.distributed.all_gather_object(rngs, learner.rng.getstate())
            if self.rank != 0:
                return str(final)
        elif with_optimizer:
            optimizer = learner.optimizer.state_dict()
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        learner.model.save_pretrained(tmp, state_dict=weights)
        learner.tokenizer.save_pretrained(tmp)
        copy_processor_files(learner.model_path, tmp)
        if with_optimizer:
            torch.save({"optimizer": optimizer, "rng": rngs[0], "rngs": rngs, "steps": learner.steps},
                       tmp / "trainer_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return str(final)

    def load(self, folder: str) -> int:
        """Weights, and where the folder has a trainer_state.pt, the optimizer state, the
        shuffle stream and the step count (a folder without one loads the weights only).
        A checkpoint written by another number of ranks loads too."""
        from copd_ray.models.loading import runtime_state_dict

        learner, weights = self.learner, runtime_state_dict(folder)
        path = Path(folder) / "trainer_state.pt"
        extra = _load_trainer_state(path) if path.exists() else None
        optim = extra["optimizer"] if extra else None
        by_name = optim is not None and any(isinstance(k, str) for k in optim["state"])
        if learner.sharded:
            if optim is not None and not by_name:
                optim = sharding.named_optimizer_state(optim, learner.model)
            sharding.load_full_state(learner.model, learner.optimizer, weights, optim)
        else:
            learner.model.load_state_dict(weights)
            if optim is not None:
                by_index = sharding.indexed_optimizer_state(optim, learner.model) if by_name else optim
                learner.optimizer.load_state_dict(by_index)
        if extra:
            rngs = extra.get("rngs") or [extra["rng"]]
            # A rank this checkpoint had no stream for starts its own from the saved one.
            learner.rng.setstate(rngs[self.rank] if self.rank < len(rngs) else rngs[0])
            if self.rank >= len(rngs):
                learner.rng.seed(f"{learner.rng.random()}/{self.rank}")
            learner.steps = extra["steps"]
        return learner.steps


def _load_trainer_state(path: Path) -> dict:
    """Tensors and plain values only (weights_only): unpickling anything else could run
    code from whoever wrote the file."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise CheckpointError(f"refusing {path}: it asks for {named[1] if named else 'a Python object'}, and loading "
                              "it could run code (a trainer state holds only tensors and plain values); use a "
                              "checkpoint this program wrote") from None
    except (RuntimeError, EOFError):
        raise CheckpointError(f"{path} is damaged (not a complete torch.save file): resume from another "
                              "checkpoint") from None
