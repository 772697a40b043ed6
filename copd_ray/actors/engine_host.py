"""What generators and scorers share: a rollout engine over the branch's live weights."""

from __future__ import annotations

import os
import time
import uuid

import ray
import torch

from copd_ray.actors.engine_gate import EngineGate
from copd_ray.actors.reloadable import Reloadable
from copd_ray.actors.weight_sync import TensorSpec, WeightGroup
from copd_ray.engines.factory import make_engine
from copd_ray.models.loading import actor_device


class EngineHost(Reloadable):
    """Base of GeneratorActor and ScorerActor (each decorated with ray.remote)."""

    def __init__(self, branch: str, model_path: str, engine_kind: str, engine_cfg: dict, dtype: str = "float32",
                 trust_remote_code: bool = False, threads: int = 1, gpus: float = 0.0, seed: int = 0) -> None:
        torch.set_num_threads(threads)
        self.branch = branch
        device = actor_device(gpus)
        self.engine, self.tokenizer = make_engine(engine_kind, model_path, engine_cfg, dtype, trust_remote_code,
                                                  device, threads, seed)
        self.gate = EngineGate(shared_reads=engine_kind == "hf")  # a scorer serves HTTP on a thread of its own
        self.weight_group: WeightGroup | None = None
        self.policy_step = 0  # the trainer's optimizer steps behind the weights held
        # New in every process Ray (re)starts: the driver tells a restarted actor by it.
        self.incarnation = uuid.uuid4().hex

    def ready(self) -> dict:
        return {"branch": self.branch, "pid": os.getpid(), "version": self.engine.version,
                "incarnation": self.incarnation, "node": ray.get_runtime_context().get_node_id()}

    def version(self) -> int:
        return self.engine.version

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights the engine holds now (for checks; large on a real model)."""
        if not hasattr(self.engine, "model"):
            raise NotImplementedError(f"a {type(self.engine).__name__} does not expose its weights")
        return {k: v.detach().cpu() for k, v in self.engine.model.state_dict().items()}

    def join_weight_group(self, name: str, world_size: int, rank: int, backend: str, transport: str = "ray",
                          address: tuple[str, int] | None = None, timeout_s: float = 120.0) -> int:
        self.weight_group = WeightGroup(name, world_size, rank, backend, transport, address, timeout_s=timeout_s)
        return rank

    def load_weights(self, state: dict[str, torch.Tensor], version: int) -> int:
        """Take weights handed over whole (a generator's `state_dict`, by reference): how a
        restarted scorer gets its branch's last synced version once the trainer has moved on."""
        with self.gate.writing():
            self.engine.update_weights(state.items(), version)
        return self.engine.version

    def receive_weights(self, plan: list[list[TensorSpec]], version: int, policy_step: int = 0) -> dict:
        start = time.perf_counter()
        with self.gate.writing():
            self.engine.update_weights(self.weight_group.receive(plan), version)
        self.policy_step = policy_step
        return {"version": self.engine.version, "seconds": time.perf_counter() - start}
