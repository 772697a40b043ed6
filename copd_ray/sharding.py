"""FSDP2 for a branch's trainer ranks: parameters, gradients and AdamW state sharded
over the ranks, whole tensors gathered only where a caller needs them.

torch's default process group is the branch's trainer ranks (the actor initialises it),
so the device mesh and every collective here use it. Plain torch, no Ray.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def shard_policy(root: nn.Module, policy: nn.Module, device: str, compute_dtype: torch.dtype) -> None:
    """`fully_shard` each language-model block, then `root` (which holds the policy): the
    root's own parameters (embeddings, output layer, norms, a vision tower) are gathered
    for its whole forward. The vision tower stays in the root on purpose: a rank whose
    micro-batch has no pixels never runs it, and a separately sharded tower would leave
    the other ranks waiting in its all-gather."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    # Compute in the model's dtype, keep float32 master weights and reduce gradients in
    # float32, so bf16 training keeps its small updates.
    mp = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                              reduce_dtype=torch.float32)
    for name, module in policy.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers") and "visual" not in name:
            for block in module:
                fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(root, mesh=mesh, mp_policy=mp)
    # Parameters a rank did not use (the vision tower, on a text-only micro-batch) still
    # take part in the gradient reduce-scatter, as zeros: every rank reduces the same tensors.
    root.set_reduce_scatter_unused_params(True)


def storage_key(tensor: torch.Tensor) -> tuple:
    """Tensors stored under two names (tied embeddings) share this key."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.data_ptr(), tuple(tensor.shape)


def full_tensor(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The whole tensor in `dtype`: a shard is cast first, so the all-gather moves the
    smaller dtype and only this one tensor is ever whole."""
    if isinstance(tensor, DTensor):
        return tensor.to(dtype).full_tensor()
    return tensor.detach().to(dtype)


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """The same numbers on every rank: summed (or maxed) over the ranks."""
    # NCCL reduces only GPU tensors; gloo CPU ones.
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def full_model_state(model: nn.Module, tied_once: bool = False) -> dict[str, torch.Tensor]:
    """The whole float32 state on rank 0's CPU ({} on the other ranks); every rank calls it.
    `tied_once`: a tensor stored under two names (tied embeddings) under its first only,
    as Hugging Face writes a tied model's file."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if tied_once and full:
        seen: set = set()
        for name, tensor in model.state_dict().items():
            key = storage_key(tensor)
            if key in seen:
                full.pop(name, None)
            seen.add(key)
    return full


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """AdamW state keyed by parameter name, whole, on rank 0's CPU; every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim: dict | None) -> None:
    """Each rank keeps its shard of whole weights (and name-keyed optimizer state)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    if optim is not None:
        set_optimizer_state_dict(model, optimizer, optim, options=options)


def named_optimizer_state(optim: dict, model: nn.Module) -> dict:
    """An optimizer state saved by a single unsharded rank (keyed by parameter index)
    keyed by parameter name instead, as sharded ranks load it."""
    names = [n for n, _ in model.named_parameters()]
    state = {names[i]: v for i, v in optim["state"].items()}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in optim["param_groups"]]
    return {"state": state, "param_groups": groups}


def indexed_optimizer_state(optim: dict, model: nn.Module) -> dict:
    """The reverse: a sharded run's name-keyed state for a single unsharded rank."""
    index = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    state = {index[n]: v for n, v in optim["state"].items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in optim["param_groups"]]
    return {"state": state, "param_groups": groups}
