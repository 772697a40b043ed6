"""The plan: every actor's row against its bundle, the checks, and what to change."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from copd_ray.config import Config
from copd_ray.topology.graph import scoring_branches
from copd_ray.plan.architecture import Architecture, architecture
from copd_ray.plan.cluster import Cluster, read_cluster
from copd_ray.plan.constants import CPU_RUNTIME_BYTES, VLLM_NON_TORCH_BYTES, GiB
from copd_ray.plan.estimate import (DTYPE_BYTES, TrainerKnobs, Workload, _prompt_tokens, _teachers, _trainer_knobs,
                                   _vllm_batched_tokens, _workload, hf_engine_parts, micro_batch, trainer_parts,
                                   vllm_parts)


# -- the rows ------------------------------------------------------------------------------------


@dataclass
class ActorMemory:
    """One actor's estimated peak memory (bytes) against its bundle's."""

    branch: str
    actor: str  # "trainer 0", "generator 1", "scorer"
    role: str  # trainer | generator | scorer
    engine: str  # trainer: "fsdp2" / "plain"; generators and scorers: hf / vllm / sglang
    gpus: float  # the bundle's GPUs
    parts: dict[str, int]  # weights, grads, optimizer, activations, logprobs, kv_cache, other
    have: int | None  # the bundle's memory; None: cannot check
    where: str  # what `have` is: "1 x H100 80GB (worker.8xh100)", "host memory", ...
    detail: str = ""  # micro-batch, KV sequences, ...
    fix: list[str] = field(default_factory=list)  # dotted overrides, each of which fixes it alone

    @property
    def need(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        return None if self.have is None else self.need <= self.have


@dataclass
class Check:
    """A check that is not one actor's: GPUs asked against the cluster's, host memory."""

    what: str
    fits: bool | None
    message: str
    fix: list[str] = field(default_factory=list)


@dataclass
class MemoryPlan:
    arch: Architecture
    rows: list[ActorMemory]
    checks: list[Check]
    memory_source: str  # where the GPU (or host) memory numbers came from
    notes: list[str]

    @property
    def fits(self) -> bool:
        return all(r.fits is not False for r in self.rows) and all(c.fits is not False for c in self.checks)

    def problems(self) -> list[str]:
        """One line per actor (ranks with equal numbers together) or check that does not fit."""
        lines = []
        for group in _groups(self.rows):
            r = group[0]
            if r.fits is False:
                knobs = " or ".join(r.fix) if r.fix else "none of its settings is enough: a bigger GPU"
                lines.append(f"{r.branch} {_group_name(group)}: needs {_gib(r.need)} GiB, has "
                             f"{_gib(r.have)} GiB ({r.where}); fix: {knobs}")
        for c in self.checks:
            if c.fits is False:
                lines.append(f"{c.message}" + (f"; fix: {' or '.join(c.fix)}" if c.fix else ""))
        return lines


# -- the plan ------------------------------------------------------------------------------------


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _gib(b: int | float | None) -> str:
    return "-" if b is None else f"{b / GiB:.1f}"


def _with(cfg: Config, **dotted: Any) -> Config:
    """The config with dotted keys changed (`_with(cfg, **{"train.gradient_checkpointing": True})`)."""
    updates: dict = {}
    for key, value in dotted.items():
        section, name = key.split(".", 1)
        if "." in name:
            sub, leaf = name.split(".", 1)
            inner = getattr(getattr(cfg, section), sub).model_copy(update={leaf: value})
            updates.setdefault(section, {})[sub] = inner
        else:
            updates.setdefault(section, {})[name] = value
    return cfg.model_copy(update={s: getattr(cfg, s).model_copy(update=u) for s, u in updates.items()})


@dataclass(frozen=True)
class _Memory:
    gpu_bytes: int | None
    gpu_name: str
    where: str  # e.g. "H100 80GB on worker.8xh100"


def plan_memory(cfg: Config, cluster: str | Path | None = None, gpu_memory_gb: float | None = None,
                model_config: str | Path | None = None, prompt_tokens: int | None = None,
                host_memory_gb: float | None = None) -> MemoryPlan:
    """Every actor's estimated peak memory against its bundle. `cluster`: a Ray cluster YAML whose
    node types give the GPU (and host) memory; `gpu_memory_gb` (GiB a GPU) overrides it;
    `host_memory_gb` is the memory a CPU-only config is checked against (default: this
    machine's, or the cluster's nodes' when `cluster` is given)."""
    arch = architecture(cfg, model_config)
    vision = f" ({_count(arch.vision_params)} in the vision tower)" if arch.vision_params else ""
    notes = [f"model: {_count(arch.params)} parameters{vision}, {arch.layers} layers, hidden {arch.hidden}, "
             f"vocabulary {arch.vocab:,}; architecture from {arch.source}"]
    if arch.counted_on_meta:
        notes.append(f"a {arch.model_type} model: parameters counted on the meta device; activations assume a "
                     "Llama-style block")
    r = cfg.resources
    uses_gpus = r.trainer_gpus > 0 or r.generator_gpus > 0 or r.scorer_gpus > 0
    clus = read_cluster(cluster) if cluster is not None else None
    checks: list[Check] = []

    # Where the GPU memory comes from.
    if gpu_memory_gb is not None:
        mem = _Memory(int(gpu_memory_gb * GiB), f"{gpu_memory_gb:g} GiB GPU", f"{gpu_memory_gb:g} GiB GPU")
        memory_source = f"--gpu-memory-gb {gpu_memory_gb:g}"
    elif clus is not None and uses_gpus:
        gpu_types = [n for n in clus.node_types if n.gpus is None or n.gpus > 0]
        unknown = [n for n in gpu_types if n.gpu_bytes is None]
        if not gpu_types:
            mem = _Memory(None, "", "no GPU node type")
            memory_source = f"{clus.source}: no node type has GPUs"
            checks.append(Check("gpus", False, f"the config asks for GPUs and {clus.source} names no GPU node "
                                               "type", ["a GPU node type in available_node_types"]))
        elif unknown:
            mem = _Memory(None, "", f"unknown instance type {unknown[0].instance_type!r}")
            memory_source = (f"{clus.source}: instance type {unknown[0].instance_type!r} of {unknown[0].name} is not "
                             "in copd_ray.plan.INSTANCE_TYPES; give --gpu-memory-gb")
        else:
            # A GPU bundle may land on any node type with GPUs: the smallest GPU is what it can count on.
            small = min(gpu_types, key=lambda n: n.gpu_bytes)
            mem = _Memory(small.gpu_bytes, small.gpu, f"{small.gpu} on {small.name}")
            memory_source = f"{clus.source}: " + "; ".join(
                f"{n.name} {n.instance_type} {n.gpus} x {n.gpu} ({_gib(n.gpu_bytes)} GiB)" for n in gpu_types)
            if len({n.gpu_bytes for n in gpu_types}) > 1:
                notes.append(f"GPU bundles may land on any of {', '.join(n.name for n in gpu_types)}: checked against "
                             f"the smallest GPU ({small.gpu} on {small.name}); a node type's resources: {{GPU: 0}} "
                             "keeps bundles off it")
    elif uses_gpus:
        mem = _Memory(None, "", "GPU memory unknown")
        memory_source = "no cluster.yaml and no --gpu-memory-gb: GPU memory unknown"
    else:
        mem = _Memory(None, "", "")
        memory_source = ""

    teachers = _teachers(cfg)
    scoring = scoring_branches(cfg, [(t, s) for s, ts in teachers.items() for t in ts])
    students = {n: sum(n in t for t in teachers.values()) for n in teachers}
    prompt, prompt_why = _prompt_tokens(cfg, arch, prompt_tokens)
    notes.append(f"sequences: {prompt:,} prompt tokens ({prompt_why}) + {cfg.grpo.max_new_tokens:,} response tokens")
    if arch.vision_params:
        notes.append("vision-tower activations of image and video rows are not counted (their tokens are, as "
                     "prompt tokens)")

    rows: list[ActorMemory] = []
    for b in cfg.branch_list():
        w = _workload(cfg, teachers[b.name], students[b.name], prompt)
        if not b.frozen:
            for i in range(r.num_trainers):
                rows.append(_trainer_row(cfg, arch, w, b.name, i, mem))
            for i in range(r.num_generators):
                rows.append(_engine_row(cfg, arch, w, b.name, f"generator {i}", "generator", cfg.engine.kind,
                                        r.generator_gpus, mem))
        if b.name in scoring:
            kind = cfg.engine.scorer_kind or cfg.engine.kind
            rows.append(_engine_row(cfg, arch, w, b.name, "scorer", "scorer", kind, r.scorer_gpus, mem,
                                    receives=not b.frozen))

    if uses_gpus and clus is not None:
        checks.extend(_gpu_count_checks(cfg, clus))
    cpu_rows = [row for row in rows if row.gpus == 0]
    if cpu_rows:
        checks.append(_host_check(cfg, cpu_rows, clus, host_memory_gb))
        if not memory_source:
            memory_source = checks[-1].what
    return MemoryPlan(arch, rows, checks, memory_source, notes)


def _bundle_memory(gpus: float, mem: _Memory) -> tuple[int | None, str]:
    if mem.gpu_bytes is None:
        return None, mem.where or "GPU memory unknown"
    share = min(gpus, 1.0)  # an actor uses one device, whatever its bundle holds
    return int(share * mem.gpu_bytes), f"{gpus:g} x {mem.where}" + (" (an actor uses one)" if gpus > 1 else "")


def _trainer_row(cfg: Config, arch: Architecture, w: Workload, branch: str, i: int, mem: _Memory) -> ActorMemory:
    k = _trainer_knobs(cfg)
    on_gpu = k.gpus > 0
    parts, detail = trainer_parts(cfg, arch, w, k, on_gpu)
    have, where = _bundle_memory(k.gpus, mem) if on_gpu else (None, "host memory")
    row = ActorMemory(branch, f"trainer {i}", "trainer", "fsdp2" if k.num_trainers > 1 else "plain", k.gpus, parts,
                      have, where, detail)
    if row.fits is False:
        row.fix = _trainer_fixes(cfg, arch, w, k, have)
    return row


def _trainer_fixes(cfg: Config, arch: Architecture, w: Workload, k: TrainerKnobs, have: int) -> list[str]:
    """Settings that each alone make a trainer rank fit (then combinations, if none does)."""
    def fits(kk: TrainerKnobs) -> bool:
        return sum(trainer_parts(cfg, arch, w, kk, True)[0].values()) <= have

    fixes = []
    if not k.checkpointing and fits(_replace(k, checkpointing=True)):
        fixes.append("train.gradient_checkpointing=true")
    per_minibatch, rows = micro_batch(cfg, w, k.num_trainers, k.max_tokens)
    r = rows
    while r > 1:
        r //= 2
        if fits(_replace(k, max_tokens=r * w.seq)):
            fixes.append(f"train.max_tokens_per_microbatch={r * w.seq}")
            break
    chunk = k.chunk
    while chunk > 128:
        chunk //= 2
        if fits(_replace(k, chunk=chunk)):
            fixes.append(f"train.logprob_chunk_tokens={chunk}")
            break
    n = k.num_trainers
    for more in (2, 4, 8, 16, 32, 64):
        if more > n and fits(_replace(k, num_trainers=more)):
            fixes.append(f"resources.num_trainers={more}")
            break
    if k.gpus < 1 and fits(_replace(k, gpus=1.0)):
        fixes.append("resources.trainer_gpus=1")
    if fixes:
        return fixes
    # None alone: checkpointing, then fewer rows a micro-batch, a smaller log-prob chunk, more ranks.
    steps, kk = [], k
    if not kk.checkpointing:
        kk = _replace(kk, checkpointing=True)
        steps.append("train.gradient_checkpointing=true")
    if not fits(kk):
        r = rows
        while r > 1 and not fits(_replace(kk, max_tokens=r * w.seq)):
            r //= 2
        if r * w.seq != kk.max_tokens:
            kk = _replace(kk, max_tokens=r * w.seq)
            steps.append(f"train.max_tokens_per_microbatch={r * w.seq}")
    while not fits(kk) and kk.chunk > 256:
        kk = _replace(kk, chunk=kk.chunk // 2)
    if kk.chunk != k.chunk:
        steps.append(f"train.logprob_chunk_tokens={kk.chunk}")
    more = kk.num_trainers
    while not fits(kk) and more < 64:
        more *= 2
        kk = _replace(kk, num_trainers=more)
    if more != k.num_trainers:
        steps.append(f"resources.num_trainers={more}")
    return [" and ".join(steps)] if fits(kk) else []


def _replace(k: TrainerKnobs, **kw) -> TrainerKnobs:
    return TrainerKnobs(**{**k.__dict__, **kw})


def _engine_row(cfg: Config, arch: Architecture, w: Workload, branch: str, actor: str, role: str, kind: str,
                gpus: float, mem: _Memory, receives: bool = True) -> ActorMemory:
    on_gpu = gpus > 0
    scorer = role == "scorer"
    have, where = _bundle_memory(gpus, mem) if on_gpu else (None, "host memory")
    # On CPU a receiver keeps one buffer per bucket across syncs (actors/weight_sync.py): a
    # second copy of the weights in the wire dtype. On a GPU the buckets stream: the one being
    # loaded and the next one arriving. A frozen teacher's scorer receives nothing.
    kept = arch.params * DTYPE_BYTES[cfg.model.dtype] if receives and not on_gpu else 0
    streamed = int(2 * cfg.ray.bucket_mb * 2**20) if receives and on_gpu else 0
    if kind in ("vllm", "sglang"):
        if on_gpu:
            row = _vllm_row(cfg, arch, w, branch, actor, role, kind, gpus, mem, have, where)
            if streamed:
                row.detail += f"; weight receive: 2 buckets ({_gib(streamed)} GiB) beside its share"
            return row
        c = DTYPE_BYTES[cfg.model.dtype]
        kv = cfg.engine.vllm.kv_cache_memory_mb * 2**20 if kind == "vllm" else 0
        parts = dict(weights=arch.params * c, grads=0, optimizer=0, activations=0, logprobs=0, kv_cache=kv,
                     other=int(CPU_RUNTIME_BYTES + VLLM_NON_TORCH_BYTES + kept))
        return ActorMemory(branch, actor, role, kind, gpus, parts, None, where,
                           f"{kind} on CPU, KV cache engine.vllm.kv_cache_memory_mb"
                           + (", kept weight-receive buffers" if kept else ""))
    parts, detail = hf_engine_parts(cfg, arch, w, scorer, on_gpu)
    parts["other"] += int(kept) + streamed
    detail += ", kept weight-receive buffers" if kept else ", 2 weight-receive buckets" if streamed else ""
    row = ActorMemory(branch, actor, role, kind, gpus, parts, have, where, detail)
    if row.fits is False:
        b = min(cfg.engine.max_batch_size, w.score_rows if scorer else w.gen_rows)
        while b > 1:
            b //= 2
            if sum(hf_engine_parts(cfg, arch, w, scorer, on_gpu, b)[0].values()) <= have:
                row.fix.append(f"engine.max_batch_size={b}")
                break
        if scorer and cfg.serve.enabled:
            row.fix.append("serve.max_request_tokens=<smaller>")
        row.fix.append(f"engine.{'scorer_kind' if scorer else 'kind'}=vllm")
        if gpus < 1:
            row.fix.append(f"resources.{role}_gpus=1")
    return row


def _vllm_row(cfg, arch, w, branch, actor, role, kind, gpus, mem, have, where) -> ActorMemory:
    """A vLLM (or SGLang) engine takes its utilisation share of the whole GPU and fills what its
    weights, profiling forward and non-torch memory leave with KV cache. It fits when that
    share is within its bundle's and holds the KV cache of one full-length sequence."""
    v, c = cfg.engine.vllm, DTYPE_BYTES[cfg.model.dtype]
    scorer = role == "scorer"
    util, knob = ((v.gpu_memory_utilization, "engine.vllm.gpu_memory_utilization") if kind == "vllm" else
                  (cfg.engine.sglang.mem_fraction_static, "engine.sglang.mem_fraction_static"))
    parts, kv_min, detail = vllm_parts(cfg, arch, w, scorer, mem.gpu_bytes, mem.gpu_name)
    if kind == "sglang":
        detail = detail.replace("vLLM", "SGLang (estimated like vLLM)")
    row = ActorMemory(branch, actor, role, kind, gpus, parts, have, where, detail)
    if mem.gpu_bytes is None:
        parts["kv_cache"] = kv_min
        return row
    budget, fixed = int(util * mem.gpu_bytes), sum(parts.values())
    kv = budget - fixed
    length = v.max_model_len or arch.max_positions or w.seq
    per_seq = length * arch.kv_bytes_per_token(c)
    row.detail = (f"{detail}; takes {util:g} of the GPU ({_gib(budget)} GiB): KV cache {_gib(max(kv, 0))} GiB = "
                  f"{max(kv, 0) / per_seq:.1f} sequences of {length:,} tokens (max_num_seqs {v.max_num_seqs})")
    share = min(gpus, 1.0)
    if kv >= kv_min:
        parts["kv_cache"] = kv  # what it takes is its whole budget
        if budget > have:  # more than its bundle's share of the GPU
            need_util = (fixed + kv_min) / mem.gpu_bytes
            if need_util <= share:
                row.fix.append(f"{knob}={math.floor(share * 100) / 100:g}")
            if gpus < 1:
                row.fix.append(f"resources.{role}_gpus={min(1.0, math.ceil(util * 100) / 100):g}")
        return row
    # Its budget holds no full-length sequence: vLLM refuses to start.
    parts["kv_cache"] = kv_min
    row.have, row.where = min(budget, have), f"{util:g} x {mem.where} ({knob})"
    need_util = (fixed + kv_min) / mem.gpu_bytes
    if need_util <= share:
        row.fix.append(f"{knob}={math.ceil(need_util * 100) / 100:g}")
    if kind == "vllm":
        fits_len = max(kv, 0) // arch.kv_bytes_per_token(c) // 1024 * 1024
        if fits_len > w.response_tokens:
            row.fix.append(f"engine.vllm.max_model_len={fits_len}")
    if gpus < 1 and need_util <= 1:
        row.fix.append(f"resources.{role}_gpus=1 and {knob}={math.ceil(need_util * 100) / 100:g}")
    if kind == "vllm" and v.enable_chunked_prefill:  # a smaller profiling forward (and prompt log-probs)
        batched = _vllm_batched_tokens(cfg, mem.gpu_bytes, mem.gpu_name) // 2
        while batched >= 1024:
            smaller = _with(cfg, **{"engine.vllm.max_num_batched_tokens": batched})
            p, _, _ = vllm_parts(smaller, arch, w, scorer, mem.gpu_bytes, mem.gpu_name)
            if sum(p.values()) + kv_min <= budget:
                row.fix.append(f"engine.vllm.max_num_batched_tokens={batched}")
                break
            batched //= 2
    return row


def _gpu_count_checks(cfg: Config, clus: Cluster) -> list[Check]:
    r = cfg.resources
    asked = 0.0
    biggest = 0.0
    for b in cfg.branch_list():
        bundles = [r.scorer_gpus] + ([] if b.frozen else [r.trainer_gpus] * r.num_trainers
                                     + [r.generator_gpus] * r.num_generators)
        asked += sum(bundles)
        biggest = max(biggest, *bundles)
    capacity = clus.gpu_capacity()
    if capacity is None:
        return [Check("gpus", None, f"GPUs: the branches' placement groups ask for {asked:g}; how many {clus.source} "
                                    "has is unknown (an instance type not in copd_ray.plan.INSTANCE_TYPES)")]
    largest_node = max((n.gpus for n in clus.node_types), default=0)
    checks = [Check("gpus", asked <= capacity,
                    f"GPUs: the branches' placement groups ask for {asked:g}; {clus.source} has up to {capacity} "
                    f"(max_workers {clus.max_workers})",
                    [] if asked <= capacity else ["a larger max_workers in cluster.yaml",
                                                  "fewer resources.num_trainers / num_generators"])]
    if biggest > largest_node:
        checks.append(Check("bundle", False, f"a bundle asks for {biggest:g} GPUs; no node type has more than "
                                             f"{largest_node}", ["resources.*_gpus <= a node's GPUs"]))
    return checks


def _host_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _host_check(cfg: Config, cpu_rows: list[ActorMemory], clus: Cluster | None, host_gb: float | None) -> Check:
    """CPU actors share their node's memory: all of them (a local Ray) or each branch's (PACK on a
    cluster node) against it, plus the driver process."""
    need = sum(r.need for r in cpu_rows) + CPU_RUNTIME_BYTES
    if host_gb is not None:
        have, where = int(host_gb * GiB), f"--host-memory-gb {host_gb:g}"
    elif clus is not None:
        sizes = [n.host_bytes for n in clus.node_types if n.host_bytes]
        if not sizes:
            return Check("host memory", None, f"CPU actors need {_gib(need)} GiB of host memory; the instance types "
                                              f"of {clus.source} are unknown: cannot check")
        branch_need = {}
        for r in cpu_rows:
            branch_need[r.branch] = branch_need.get(r.branch, 0) + r.need
        need = max(branch_need.values()) + CPU_RUNTIME_BYTES
        have, where = max(sizes), f"the largest node of {clus.source}"
    else:
        have, where = _host_bytes(), "this machine (a local Ray)"
    if have is None:
        return Check("host memory", None, f"CPU actors need {_gib(need)} GiB of host memory: cannot read this "
                                          "machine's memory; give --host-memory-gb")
    fits = need <= have
    for row in cpu_rows:
        row.where = f"host memory, shared ({where})"
    return Check(f"host memory of {where}", fits,
                 f"host memory: the CPU actors{' of the largest branch' if clus is not None else ''} and the driver "
                 f"need {_gib(need)} GiB of {_gib(have)} GiB ({where})",
                 [] if fits else ["resources.num_generators=1", "engine.max_batch_size=<smaller>",
                                  "train.max_tokens_per_microbatch=<smaller>"])


# -- the table -----------------------------------------------------------------------------------

TABLE_WIDTH = 110  # the table's natural width: printed whole even where the console is narrower
COLUMNS = ("weights", "grads", "optimizer", "activations", "logprobs", "kv_cache", "other")


def _key(r: ActorMemory) -> tuple:
    return (r.branch, r.role, r.engine, r.gpus, tuple(r.parts.items()), r.have, r.detail, tuple(r.fix))


def _groups(rows: list[ActorMemory]) -> list[list[ActorMemory]]:
    """Consecutive rows of one branch and role with equal numbers, together."""
    groups: list[list[ActorMemory]] = []
    for r in rows:
        if groups and _key(groups[-1][0]) == _key(r):
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def _group_name(group: list[ActorMemory]) -> str:
    if len(group) == 1:
        return group[0].actor
    first, last = group[0].actor.rsplit(" ", 1), group[-1].actor.rsplit(" ", 1)
    return f"{first[0]}s {first[1]}-{last[1]}"
