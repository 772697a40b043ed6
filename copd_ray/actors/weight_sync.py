"""Moving weights from trainer rank 0 to a branch's generators and scorer.

One group per branch (gloo on CPU, nccl on GPUs): a Ray collective group, or a
standalone torch process group where an engine holds torch's default group. The sender packs the
state dict into buckets of one dtype; each bucket is one `broadcast` call, so a sync is
a handful of collective calls and one remote call per receiver, never one per tensor.
Tied tensors (an embedding shared with the output layer) travel once.

A sync runs near the speed of the broadcast itself (`benchmarks/weight_sync.py`): packing
into a fresh buffer per bucket (`torch.cat`, a `.to(dtype)` per tensor) cost as much as the
broadcast on CPU, where every fresh large buffer is paid again in page faults. So the sender
copies each tensor once, cast on the way, into one of two buffers it keeps, and fills the
next bucket while the last is on the wire; receivers keep their buffers (on CPU) and take
the next bucket while the engine loads the last.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from copd_ray.models.loading import torch_dtype


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


def fill(flat: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Copy one bucket's tensors (in plan order) into the front of `flat` and return that
    part: one pass per tensor, cast to `flat`'s dtype (and moved to its device) on the way."""
    offset = 0
    for t in tensors:
        n = t.numel()
        flat[offset : offset + n].view(t.shape).copy_(t.detach())
        offset += n
    return flat[:offset]


def pack(tensors: list[torch.Tensor], device) -> torch.Tensor:
    """One bucket's tensors (in plan order, of one dtype) as one new flat buffer."""
    return fill(torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=device), tensors)


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
    group; on gloo the buckets travel over a torch group of the same members, which unlike
    Ray's broadcast does not block). transport "torch": a standalone gloo/nccl process
    group with its own store, for members whose default group is already taken: an
    in-process vLLM or SGLang engine initialises torch.distributed for itself, and a
    second default group cannot exist.
    """

    def __init__(self, name: str, world_size: int, rank: int, backend: str, transport: str = "ray",
                 address: tuple[str, int] | None = None, store=None, timeout_s: float = 120.0) -> None:
        self.name, self.rank, self.world_size, self.transport = name, rank, world_size, transport
        self.device = "cuda" if backend == "nccl" else "cpu"
        self._send_bytes = [torch.empty(0, dtype=torch.uint8, device=self.device) for _ in range(2)]
        self._kept: dict[int, torch.Tensor] = {}  # receive buffers by bucket (a group has one plan)
        if transport == "ray":
            from ray.util import collective

            collective.init_collective_group(
                world_size, rank, backend=backend, group_name=name, gloo_timeout=int(timeout_s * 1000)
            )
            # Ray's broadcast blocks. On gloo its group is torch's default group, made of this
            # group's members: a torch group of theirs lets one bucket travel while the next
            # is filled or the last loaded.
            self._pg = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s)) \
                if backend == "gloo" else None
            return
        timeout = datetime.timedelta(seconds=timeout_s)
        if store is None:
            store = torch.distributed.TCPStore(address[0], address[1], world_size, is_master=False, timeout=timeout)
        self._store = store  # keep the rendezvous alive as long as the group
        prefixed = torch.distributed.PrefixStore(name, store)
        if backend == "nccl":  # torch's default would be its own 10 minutes
            options = torch.distributed.ProcessGroupNCCL.Options()
            options._timeout = timeout  # as torch's init_process_group sets it
            self._pg = torch.distributed.ProcessGroupNCCL(prefixed, rank, world_size, options)
        else:
            self._pg = torch.distributed.ProcessGroupGloo(prefixed, rank, world_size, timeout)

    def _start(self, flat: torch.Tensor) -> torch.distributed.Work | _Done:
        """Begin broadcasting `flat`; the handle's wait() returns once this rank may touch it."""
        if self._pg is None:
            from ray.util import collective

            collective.broadcast(flat, src_rank=0, group_name=self.name)  # blocking: no overlap here
            if self.device == "cuda":  # Ray's NCCL broadcast returns before its stream is done with `flat`
                torch.cuda.synchronize()
            return _DONE
        return self._pg.broadcast([flat], torch.distributed.BroadcastOptions())

    def send(self, plan: list[list[TensorSpec]], buckets: Iterable[list[torch.Tensor]]) -> int:
        """Broadcast each bucket's tensors (in plan order) as one flat buffer in the plan's
        wire dtype. Two buffers, kept: one is filled while the other is on the wire."""
        pending: list[torch.distributed.Work | _Done] = [_DONE, _DONE]
        sent = 0
        for i, (bucket, tensors) in enumerate(zip(plan, buckets)):
            slot = i % 2
            pending[slot].wait()  # this buffer's previous bucket has left
            flat = fill(self._send_buffer(slot, bucket), tensors)
            pending[slot] = self._start(flat)
            sent += flat.numel() * flat.element_size()
        for p in pending:
            p.wait()
        return sent

    def _send_buffer(self, slot: int, bucket: list[TensorSpec]) -> torch.Tensor:
        """Bytes kept across buckets and syncs, grown to the largest bucket, seen as its dtype."""
        dtype = torch_dtype(bucket[0].dtype)
        nbytes = sum(s.numel for s in bucket) * dtype.itemsize
        if self._send_bytes[slot].numel() < nbytes:
            self._send_bytes[slot] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self._send_bytes[slot][:nbytes].view(dtype)

    def receive(self, plan: list[list[TensorSpec]]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in plan order: views into buffers this group may refill on its next
        sync, so a consumer copies them before then. The next bucket is already on its way
        while the consumer loads this one."""
        buffers = (self._receive_buffer(i, bucket) for i, bucket in enumerate(plan))
        incoming = ((flat, self._start(flat)) for flat in buffers)
        arriving = next(incoming)
        for bucket in plan:
            flat, pending = arriving
            pending.wait()
            arriving = next(incoming, None)  # the next bucket comes in while the consumer loads this one
            yield from unpack(flat, bucket)

    def _receive_buffer(self, i: int, bucket: list[TensorSpec]) -> torch.Tensor:
        """Bucket i's buffer, one per bucket: a consumer may hold a bucket's views while it
        reads the next (vLLM's layer-wise reload keeps a layer's until the layer is whole). Kept across syncs on CPU, where
        a fresh large buffer costs its page faults again on every sync; on a GPU torch's
        caching allocator already reuses memory, and a kept copy of the model would take
        memory from the engine."""
        dtype, numel = torch_dtype(bucket[0].dtype), sum(s.numel for s in bucket)
        if self.device != "cpu":
            return torch.empty(numel, dtype=dtype, device=self.device)
        kept = self._kept.get(i)
        if kept is None or kept.dtype != dtype or kept.numel() != numel:
            kept = self._kept[i] = torch.empty(numel, dtype=dtype)
        return kept


class _Done:
    """The handle of a broadcast that has already finished."""

    def wait(self) -> None:
        pass


_DONE = _Done()
