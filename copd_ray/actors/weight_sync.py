"""Moving weights from trainer rank 0 to a branch's generators and scorer.

One group per branch (gloo on CPU, nccl on GPUs): a Ray collective group, or a
standalone torch process group where an engine holds torch's default group. The sender packs the
state dict into buckets of one dtype; each bucket is one `broadcast` call, so a sync is
a handful of collective calls and one remote call per receiver, never one per tensor.
Tied tensors (an embedding shared with the output layer) travel once.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool)}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    aliases: tuple[str, ...] = ()  # other names of the same storage (a tied output layer)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def bucket_plan(state_dict: dict[str, torch.Tensor], bucket_bytes: int,
                dtype: torch.dtype | None = None) -> list[list[TensorSpec]]:
    """Group the tensors into buckets of one dtype up to `bucket_bytes`; floating tensors
    travel in `dtype` where given (the receivers' dtype). A tensor stored under several
    names (tied embeddings) travels once and arrives under every name: some engines
    (vLLM) load a tied output layer only when it is named. Shards (DTensors) are planned
    by their whole shape. Sender and receivers use the same plan; the sender computes it
    and hands it over."""
    from copd_ray.sharding import storage_key

    names_of: dict[tuple, list[str]] = {}
    for name, tensor in state_dict.items():
        names_of.setdefault(storage_key(tensor), []).append(name)
    buckets: list[list[TensorSpec]] = []
    size, current = 0, None
    for names in names_of.values():
        tensor = state_dict[names[0]]
        wire = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        nbytes = tensor.numel() * wire.itemsize
        if not buckets or wire != current or size + nbytes > bucket_bytes:
            buckets.append([])
            size, current = 0, wire
        buckets[-1].append(TensorSpec(names[0], tuple(tensor.shape), str(wire), tuple(names[1:])))
        size += nbytes
    return buckets


def pack(tensors: list[torch.Tensor], device) -> torch.Tensor:
    """One bucket's tensors (in plan order) as one flat buffer."""
    return torch.cat([t.detach().reshape(-1) for t in tensors]).to(device).contiguous()


def unpack(flat: torch.Tensor, bucket: list[TensorSpec]) -> Iterator[tuple[str, torch.Tensor]]:
    offset = 0
    for s in bucket:
        tensor = flat[offset : offset + s.numel].view(s.shape)
        for name in (s.name, *s.aliases):
            yield name, tensor
        offset += s.numel


def host_store(world_size: int, timeout_s: float = 120.0):
    """A TCPStore on this node for a standalone group's rendezvous: (store, host, port)."""
    import ray

    host = ray.util.get_node_ip_address()
    store = torch.distributed.TCPStore(host, 0, world_size, is_master=True,
                                       timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    return store, host, store.port


class WeightGroup:
    """This process's membership in its branch's weight-sync group.

    transport "ray": a `ray.util.collective` group (it builds on torch's default process
    group). transport "torch": a standalone gloo/nccl process group with its own store,
    for members whose default group is already taken: an in-process vLLM or SGLang engine
    initialises torch.distributed for itself, and a second default group cannot exist.
    """

    def __init__(self, name: str, world_size: int, rank: int, backend: str, transport: str = "ray",
                 address: tuple[str, int] | None = None, store=None, timeout_s: float = 120.0) -> None:
        self.name, self.rank, self.world_size, self.transport = name, rank, world_size, transport
        self.device = "cuda" if backend == "nccl" else "cpu"
        if transport == "ray":
            from ray.util import collective

            collective.init_collective_group(
                world_size, rank, backend=backend, group_name=name, gloo_timeout=int(timeout_s * 1000)
            )
            return
        timeout = datetime.timedelta(seconds=timeout_s)
        if store is None:
            store = torch.distributed.TCPStore(address[0], address[1], world_size, is_master=False, timeout=timeout)
        self._store = store  # keep the rendezvous alive as long as the group
        prefixed = torch.distributed.PrefixStore(name, store)
        if backend == "nccl":
            self._pg = torch.distributed.ProcessGroupNCCL(prefixed, rank, world_size)
        else:
            self._pg = torch.distributed.ProcessGroupGloo(prefixed, rank, world_size, timeout)

    def _broadcast(self, flat: torch.Tensor) -> None:
        if self.transport == "ray":
            from ray.util import collective

            collective.broadcast(flat, src_rank=0, group_name=self.name)
        else:
            self._pg.broadcast([flat], torch.distributed.BroadcastOptions()).wait()

    def send(self, buckets: Iterable[list[torch.Tensor]]) -> int:
        """Broadcast each bucket's tensors (in plan order) as one flat buffer."""
        sent = 0
        for tensors in buckets:
            flat = pack(tensors, self.device)
            self._broadcast(flat)
            sent += flat.numel() * flat.element_size()
        return sent

    def receive(self, plan: list[list[TensorSpec]]) -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in plan:
            flat = torch.empty(sum(s.numel for s in bucket), dtype=DTYPES[bucket[0].dtype], device=self.device)
            self._broadcast(flat)
            yield from unpack(flat, bucket)
