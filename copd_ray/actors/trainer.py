"""TrainerActor: a branch's Learner (policy, optimizer, the clipped update) as one rank of
its data-parallel group; rank 0 also broadcasts the weights and writes checkpoints.
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

from copd_ray.actors.weight_sync import WeightGroup, bucket_plan, host_store
from copd_ray.errors import CheckpointError
from copd_ray.learner import Learner
from copd_ray.models.loading import copy_processor_files


@ray.remote
class TrainerActor(Learner):
    def __init__(self, branch: str, rank: int, world_size: int, model_path: str, grpo: dict,
                 dtype: str = "float32", trust_remote_code: bool = False, threads: int = 1,
                 gpus: float = 0.0, seed: int = 0) -> None:
        device = "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
        self._learner_args = (branch, rank, world_size, model_path, grpo, dtype, trust_remote_code, threads, device, seed)
        super().__init__(*self._learner_args)
        self.weight_group: WeightGroup | None = None
        # New in every process Ray (re)starts: the driver tells a restarted actor by it.
        self.incarnation = uuid.uuid4().hex

    def ready(self) -> dict:
        return {"branch": self.branch, "rank": self.rank, "pid": os.getpid(), "incarnation": self.incarnation}

    def reset(self) -> None:
        """Back to the start of the run (weights from model_path, fresh optimizer and
        shuffling), keeping the groups: a rollback to before the first checkpoint."""
        dp_group = self.dp_group
        Learner.__init__(self, *self._learner_args)
        self.dp_group = dp_group

    # -- groups -------------------------------------------------------------------------

    def dp_address(self) -> tuple[str, int]:
        """Rank 0 hosts the rendezvous store of the data-parallel group."""
        self._store, host, port = host_store(self.world_size)
        return host, port

    def join_dp_group(self, host: str, port: int, generation: int = 0) -> None:
        # A standalone process group, not the default one: the weight-sync collective
        # group on rank 0 already owns torch's default group.
        if self.rank != 0:
            self._store = torch.distributed.TCPStore(host, port, self.world_size, is_master=False,
                                                     timeout=datetime.timedelta(seconds=120))
        store = torch.distributed.PrefixStore(f"copd-dp-{self.branch}-{generation}", self._store)
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

    # -- weights ------------------------------------------------------------------------

    def weight_plan(self, bucket_mb: float) -> list:
        return bucket_plan(self.serving_state(), int(bucket_mb * 2**20))

    def send_weights(self, plan: list) -> dict:
        start = time.perf_counter()
        sent = self.weight_group.send(self.serving_state(), plan)
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
        """Weights, and where the folder has a trainer_state.pt, the optimizer state, the
        shuffle stream and the step count (a folder without one loads the weights only)."""
        # Through from_pretrained: a vision-language checkpoint's tensor names on disk are
        # not its runtime names, and transformers alone knows the mapping.
        from copd_ray.models.loading import model_class

        saved = model_class(folder).from_pretrained(folder, dtype=torch.float32)
        self.model.load_state_dict(saved.state_dict())
        del saved
        path = Path(folder) / "trainer_state.pt"
        if path.exists():
            extra = _load_trainer_state(path)
            self.optimizer.load_state_dict(extra["optimizer"])
            self.rng.setstate(extra["rng"])
            self.steps = extra["steps"]
        return self.steps


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
