"""Moving weights from trainer rank 0 to a branch's generators and scorer.

One Ray collective group per branch (gloo on CPU, nccl on GPUs). The sender packs the
state dict into buckets of one dtype; each bucket is one `broadcast` call, so a sync is
a handful of collective calls and one remote call per receiver, never one per tensor.
Tied tensors (an embedding shared with the output layer) travel once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool)}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def bucket_plan(state_dict: dict[str, torch.Tensor], bucket_bytes: int) -> list[list[TensorSpec]]:
    """Group the (deduplicated) tensors into buckets of one dtype up to `bucket_bytes`.
    Sender and receivers use the same plan; the sender computes it and hands it over."""
    buckets: list[list[TensorSpec]] = []
    seen: set[int] = set()
    size, dtype = 0, None
    for name, tensor in state_dict.items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        nbytes = tensor.numel() * tensor.element_size()
        if not buckets or tensor.dtype != dtype or size + nbytes > bucket_bytes:
            buckets.append([])
            size, dtype = 0, tensor.dtype
        buckets[-1].append(TensorSpec(name, tuple(tensor.shape), str(tensor.dtype)))
        size += nbytes
    return buckets


def pack(state_dict: dict[str, torch.Tensor], bucket: list[TensorSpec], device) -> torch.Tensor:
    return torch.cat([state_dict[s.name].detach().reshape(-1) for s in bucket]).to(device).contiguous()


def unpack(flat: torch.Tensor, bucket: list[TensorSpec]) -> Iterator[tuple[str, torch.Tensor]]:
    offset = 0
    for s in bucket:
        yield s.name, flat[offset : offset + s.numel].view(s.shape)
        offset += s.numel


class WeightGroup:
    """This process's membership in its branch's weight-sync collective group."""

    def __init__(self, name: str, world_size: int, rank: int, backend: str, timeout_s: float = 120.0) -> None:
        from ray.util import collective

        self.name, self.rank, self.world_size = name, rank, world_size
        self.device = "cuda" if backend == "nccl" else "cpu"
        collective.init_collective_group(
            world_size, rank, backend=backend, group_name=name, gloo_timeout=int(timeout_s * 1000)
        )

    def send(self, state_dict: dict[str, torch.Tensor], plan: list[list[TensorSpec]]) -> int:
        from ray.util import collective

        sent = 0
        for bucket in plan:
            flat = pack(state_dict, bucket, self.device)
            collective.broadcast(flat, src_rank=0, group_name=self.name)
            sent += flat.numel() * flat.element_size()
        return sent

    def receive(self, plan: list[list[TensorSpec]]) -> Iterator[tuple[str, torch.Tensor]]:
        from ray.util import collective

        for bucket in plan:
            flat = torch.empty(sum(s.numel for s in bucket), dtype=DTYPES[bucket[0].dtype], device=self.device)
            collective.broadcast(flat, src_rank=0, group_name=self.name)
            yield from unpack(flat, bucket)
