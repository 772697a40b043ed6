"""Step data at the paper's shape: what each trainer rank fetches and holds, lists vs packed.

    python benchmarks/step_data.py [--scale 1.0] [--ranks 4] [--small]

A synthetic step of the paper's shape (256 prompts x 8 samples, prompts and responses each
up to 16k tokens, drawn uniformly; two teachers, each with an OPD batch of the same shape;
two generators), laid out two ways and checked to hold the same rows before anything is timed:

- lists (the layout before): every Rollouts and TeacherScores of the step as Python lists
  of token ids and floats, and every rank fetches all of them (then keeps its share);
- packed (now): flat int32 tokens and float32 log-probs per generator, dealt by the generators
  to the ranks (whole GRPO groups, balanced by tokens); a rank fetches its own share only.

For each it prints the bytes a rank fetches (pickled, as Ray moves them), the seconds to
pickle and unpickle them, and the host memory the unpickled objects take (tensor data,
containers, and each int and float object of a list), then that of the trainer's batch
that `assemble` builds from rank 0's share (the Learner's input). Goals (issue 25): a rank
fetches at most 1/N of the batch + 5%, and its step data take at most 1.5x the packed bytes
of its share. --scale shrinks every length (--small: 1/16 and 2 ranks, for tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import sys
import time

import torch

from copd_ray.batch import assemble
from copd_ray.step_data import OPDEdge, Rollouts, StepSpec, TeacherScores

PROMPTS, GROUP, TEACHERS, GENERATORS, MAX_LEN = 256, 8, 2, 2, 16384


def host_bytes(obj) -> int:
    """What objects take in host memory: tensors' data, containers, and every int (past
    Python's cached -5..256) or float object a list holds."""
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if dataclasses.is_dataclass(obj):
        return sum(host_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, dict):
        return sys.getsizeof(obj) + sum(host_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        size = sys.getsizeof(obj)
        if obj and isinstance(obj[0], (int, float)):
            return size + sum(sys.getsizeof(x) for x in obj if not (type(x) is int and -5 <= x <= 256))
        return size + sum(host_bytes(x) for x in obj)
    return sys.getsizeof(obj)


def generator_rollouts(g: torch.Generator, prompts: int, max_len: int) -> Rollouts:
    """`prompts` x GROUP packed rows: one prompt per group, each sample its own response."""
    plens = torch.randint(16, max_len + 1, (prompts,), generator=g).repeat_interleave(GROUP)
    rlens = torch.randint(1, max_len + 1, (prompts * GROUP,), generator=g)
    rows = []
    for p in range(prompts):
        prompt = torch.randint(0, 150_000, (int(plens[p * GROUP]),), generator=g, dtype=torch.int32)
        rows += [torch.cat([prompt, torch.randint(0, 150_000, (int(r),), generator=g, dtype=torch.int32)])
                 for r in rlens[p * GROUP : (p + 1) * GROUP]]
    rewards = (torch.rand(prompts * GROUP, generator=g) < 0.5).double()
    return Rollouts(torch.cat(rows), plens + rlens, plens, -torch.rand(int(rlens.sum()), generator=g), rewards, 3, 3, 1.0)


def as_lists(r: Rollouts | TeacherScores, rollouts: Rollouts | None = None) -> dict:
    """The layout before: Python lists of token ids and per-row float lists."""
    if isinstance(r, TeacherScores):
        return {"logprobs": rollouts.per_row(r.logprobs), "version": r.version, "seconds": r.seconds}
    return {"sequences": r.sequences(), "prompt_lengths": r.prompt_lengths.tolist(),
            "logprobs": r.per_row(r.logprobs), "rewards": r.rewards.tolist(), "version": r.version}


def measure(objects) -> dict:
    """Pickled bytes, pickle and unpickle seconds, and host memory once unpickled."""
    start = time.perf_counter()
    blob = pickle.dumps(objects, protocol=5)
    dumped = time.perf_counter() - start
    start = time.perf_counter()
    loaded = pickle.loads(blob)
    return {"bytes": len(blob), "dump_s": dumped, "load_s": time.perf_counter() - start, "memory": host_bytes(loaded)}


def build(scale: float, ranks: int):
    g = torch.Generator().manual_seed(0)
    max_len = max(int(MAX_LEN * scale), 32)
    per_gen = PROMPTS // GENERATORS
    native = [generator_rollouts(g, per_gen, max_len) for _ in range(GENERATORS)]
    edges = []
    for _ in range(TEACHERS):
        parts = [generator_rollouts(g, per_gen, max_len) for _ in range(GENERATORS)]
        scores = TeacherScores(-torch.rand(sum(len(p.logprobs) for p in parts), generator=g), 5, 1.0)
        edges.append((parts, scores))
    spec = StepSpec(1, "opd", GROUP, GENERATORS, [OPDEdge(f"t{i}", GENERATORS) for i in range(TEACHERS)])
    # Each rank's share: every generator's rows dealt to the ranks, the teachers' scores cut to match.
    shares = [[p.split(ranks, GROUP)[r] for p in native] for r in range(ranks)]
    for parts, scores in edges:
        dealt = [p.split(ranks, GROUP) for p in parts]
        cut = scores.cut([d[r] for d in dealt for r in range(ranks)], ranks)
        for r in range(ranks):
            shares[r] += [d[r] for d in dealt] + [cut[r]]
    whole = native + [x for parts, scores in edges for x in (*parts, scores)]
    lists = [as_lists(x) for x in native] + [y for parts, scores in edges for y in (
        *(as_lists(x) for x in parts), as_lists(scores, Rollouts.concat(parts)))]
    return spec, whole, lists, shares


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=1.0, help="every length times this (1: the paper's 16k + 16k)")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--small", action="store_true", help="--scale 1/16 --ranks 2")
    a = p.parse_args()
    scale, ranks = (1 / 16, 2) if a.small else (a.scale, a.ranks)
    spec, whole, lists, shares = build(scale, ranks)
    rows = sum(len(x) for x in whole if isinstance(x, Rollouts))
    tokens = sum(len(x.tokens) for x in whole if isinstance(x, Rollouts))
    # Checked first: the shares hold every row of the step once, with its log-probs and scores.
    assert sum(len(x) for s in shares for x in s if isinstance(x, Rollouts)) == rows
    assert sum(len(x.tokens) for s in shares for x in s if isinstance(x, Rollouts)) == tokens
    whole_scores = sum(len(x.logprobs) for x in whole if isinstance(x, TeacherScores))
    assert sum(len(x.logprobs) for s in shares for x in s if isinstance(x, TeacherScores)) == whole_scores
    print(f"a step of {rows} rows, {tokens / 1e6:.1f}M tokens, {TEACHERS} teachers, {GENERATORS} generators, "
          f"{ranks} ranks (scale {scale:g})")

    assert sum(len(x["sequences"]) for x in lists if "sequences" in x) == rows
    old = measure(lists)
    del lists
    new = [measure(s) for s in shares]
    packed = [sum(x.tokens.nbytes + x.lengths.nbytes + x.prompt_lengths.nbytes + x.logprobs.nbytes + x.rewards.nbytes
                  if isinstance(x, Rollouts) else x.logprobs.nbytes for x in s) for s in shares]
    batch, _ = assemble(spec, tuple(shares[0]), trainer_steps=3)
    assembled = host_bytes(batch)
    del batch
    gb = 2**30
    print(f"\n{'per rank':<28}{'fetched GB':>12}{'pickle s':>10}{'unpickle s':>12}{'host GB':>10}")
    print(f"{'lists, the whole step':<28}{old['bytes'] / gb:12.2f}{old['dump_s']:10.1f}{old['load_s']:12.1f}"
          f"{old['memory'] / gb:10.2f}")
    for r, m in enumerate(new):
        print(f"{f'packed, rank {r} share':<28}{m['bytes'] / gb:12.2f}{m['dump_s']:10.1f}{m['load_s']:12.1f}"
              f"{m['memory'] / gb:10.2f}")
    total = sum(m["bytes"] for m in new)
    worst = max(m["bytes"] for m in new) / (total / ranks)
    held = max(m["memory"] / b for m, b in zip(new, packed))
    print(f"\nlargest share / (batch / {ranks}): {worst:.3f} (goal <= 1.05); fetched, lists / packed share: "
          f"{old['bytes'] / max(m['bytes'] for m in new):.1f}x")
    print(f"host memory / packed bytes of the share, as fetched: {held:.2f} (goal <= 1.5)")
    print(f"rank 0's training batch as `assemble` builds it: {assembled / gb:.3f} GB = {assembled / packed[0]:.2f}x "
          "its packed bytes (goal <= 1.5)")


if __name__ == "__main__":
    main()
