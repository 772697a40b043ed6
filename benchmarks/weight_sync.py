"""Weight sync of a ~150 MB policy from trainer rank 0 to two receivers: the project's path
beside a raw broadcast of the same bytes among the same processes.

    python benchmarks/weight_sync.py [--small] [--repeats 7] [--bucket-mb 64] [--model FOLDER]

Starts a local Ray with one TrainerActor (one rank, the sender), a GeneratorActor and a
ScorerActor (pure-torch engines) over a Qwen3 built here from a config (no download; hidden
512, 7 layers, MLP 1536, vocabulary 32,000, tied embeddings: 38M parameters, 154 MB in
float32). For each transport (the standalone torch gloo group; Ray's collective group) and
each wire dtype (float32, and bfloat16 cast from the float32 master weights; the receivers'
models are cast to the wire dtype, as engines of that model.dtype hold them), interleaved:

- project: what `BranchGroup.sync` runs: the trainer's `send_weights` (`bucket_tensors` and
  `WeightGroup.send`) and each receiver's `receive_weights` (`WeightGroup.receive` loaded by
  the engine's `update_weights`), over the trainer's bucket plan (`bucket_plan`);
- raw: the same group broadcasting buffers of the plan's bucket sizes, allocated once and
  filled once with the same bytes: nothing packed, nothing loaded.

A time is the driver's wall time of the calls to all three actors, as `BranchGroup.sync`
sees it. Before anything is timed the trainer's weights are changed and synced, and every
receiver must then hold them exactly (in the wire dtype), and the raw buffers must arrive
byte for byte: any difference stops the benchmark (exit status 1). Prints the median seconds
of each, GB/s (the plan's bytes, which every receiver gets, over the median) and
project/raw. `--small` (a 1.5M-parameter model, 1 MB buckets) runs the same in under a
minute; `--model FOLDER` syncs a real checkpoint instead (e.g. SmolLM2-135M-Instruct, the folder
`copd-ray import-gguf` prints: 134.5M parameters, 538 MB in float32).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time

from trainer_memory import Model, build_folder  # a sibling script: benchmarks/ is on the path

TRANSPORTS = ("torch", "ray")
WIRES = ("float32", "bfloat16")


# The Qwen3 of random weights that benchmarks/trainer_memory.py builds, at other sizes.
FULL = Model(512, 7, 8, 4, 64, 1536, 32000)
SMALL = Model(128, 2, 4, 2, 32, 384, 8000)


# -- run inside the actors (actor.__ray_call__: the first argument is the actor itself) ------


def weights_of(actor) -> dict:
    return (actor.engine.model if hasattr(actor, "engine") else actor.learner.model).state_dict()


def plan_of(actor, bucket_mb: float, wire: str) -> list:
    """`TrainerActor.weight_plan` with a chosen wire dtype (it uses the trainer's compute dtype)."""
    import torch

    from copd_ray.actors.weight_sync import bucket_plan

    return bucket_plan(weights_of(actor), int(bucket_mb * 2**20), getattr(torch, wire))


def hold_in(actor, dtype: str) -> None:
    """The receiver's model in `dtype`, as an engine of that model.dtype holds it."""
    import torch

    actor.engine.model.to(getattr(torch, dtype))


def change_weights(actor, seed: int) -> None:
    """New trainer weights, so that a receiver holds them only if the sync delivered them."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in actor.learner.model.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=0.01)


def digest(actor, plan: list) -> str:
    """The weights under every name of the plan, in its wire dtype, as one hash."""
    import torch

    from copd_ray.models.loading import torch_dtype

    state, h = weights_of(actor), hashlib.sha256()
    for bucket in plan:
        for s in bucket:
            for name in (s.name, *s.aliases):
                h.update(state[name].detach().to(torch_dtype(s.dtype)).reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def raw_setup(actor, plan: list) -> str:
    """Buffers of the plan's bucket sizes, kept; the sender's hold its packed weights (the
    bytes the project sends). Returns their hash."""
    import torch

    from copd_ray.actors.weight_sync import pack
    from copd_ray.models.loading import torch_dtype

    state, h = weights_of(actor), hashlib.sha256()
    actor.raw_buffers = [
        pack([state[s.name].to(torch_dtype(s.dtype)) for s in b], "cpu") if actor.weight_group.rank == 0
        else torch.zeros(sum(s.numel for s in b), dtype=torch_dtype(b[0].dtype)) for b in plan]
    for buf in actor.raw_buffers:
        h.update(buf.view(torch.uint8).numpy())
    return h.hexdigest()


def raw_broadcast(actor) -> None:
    """Each kept buffer through the group's bare broadcast, one after the other."""
    for buf in actor.raw_buffers:
        actor.weight_group._start(buf).wait()


def raw_digest(actor) -> str:
    import torch

    h = hashlib.sha256()
    for buf in actor.raw_buffers:
        h.update(buf.view(torch.uint8).numpy())
    return h.hexdigest()


# -- the driver ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a 1.5M-parameter model, 1 MB buckets, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed syncs of each path (default 7; --small 3)")
    parser.add_argument("--bucket-mb", type=float, default=None, help="default: ray.bucket_mb (--small: 1)")
    parser.add_argument("--model", default=None, help="a Hugging Face model folder instead of the built Qwen3")
    args = parser.parse_args()

    import ray
    import torch

    from copd_ray.actors import GeneratorActor, ScorerActor, TrainerActor
    from copd_ray.config import load_config

    torch.set_num_threads(1)
    cfg = load_config(None, [])
    model = SMALL if args.small else FULL
    repeats = args.repeats or (3 if args.small else 7)
    bucket_mb = args.bucket_mb or (1.0 if args.small else cfg.ray.bucket_mb)
    if args.model:
        from transformers import AutoConfig, AutoModelForCausalLM

        folder = args.model
        with torch.device("meta"):
            params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
                         .parameters())
    else:
        folder = tempfile.mkdtemp() + "/policy"
        params = build_folder(model, folder)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    trainer = TrainerActor.options(num_cpus=0.5).remote("bench", 0, 1, folder, cfg.grpo, threads=1)
    engine = dict(engine_cfg=cfg.engine.model_dump(), threads=1)
    receivers = [GeneratorActor.options(num_cpus=0.5).remote("bench", folder, "hf", **engine),
                 ScorerActor.options(num_cpus=0.5).remote("bench", folder, "hf", **engine)]
    members = [trainer, *receivers]
    ray.get([a.ready.remote() for a in members])

    def join(transport: str) -> None:
        name, world = f"bench-weights-{transport}", len(members)
        address = ray.get(trainer.weight_store.remote(world)) if transport == "torch" else None
        ray.get([trainer.join_weight_group.remote(name, world, 0, "gloo", transport)]
                + [r.join_weight_group.remote(name, world, i + 1, "gloo", transport, address)
                   for i, r in enumerate(receivers)])

    version = 0

    def project(plan: list) -> None:
        nonlocal version
        version += 1
        ray.get([trainer.send_weights.remote(plan)] + [r.receive_weights.remote(plan, version) for r in receivers])

    def raw() -> None:
        ray.get([a.__ray_call__.remote(raw_broadcast) for a in members])

    def check(plan: list, seed: int) -> None:
        """Stop unless a sync delivers changed weights exactly, and a raw broadcast its bytes."""
        ray.get(trainer.__ray_call__.remote(change_weights, seed))
        sent = ray.get(trainer.__ray_call__.remote(digest, plan))
        if sent in ray.get([r.__ray_call__.remote(digest, plan) for r in receivers]):
            raise SystemExit("the receivers held the changed weights before any sync: the check would prove nothing")
        project(plan)
        held = ray.get([r.__ray_call__.remote(digest, plan) for r in receivers])
        if held != [sent] * len(receivers):
            raise SystemExit(f"project path: a receiver's weights differ from the trainer's (wire {plan[0][0].dtype})")
        packed = ray.get([a.__ray_call__.remote(raw_setup, plan) for a in members])[0]
        raw()
        if ray.get([a.__ray_call__.remote(raw_digest) for a in members]) != [packed] * len(members):
            raise SystemExit("raw broadcast: a receiver's buffers differ from the sender's")

    rows = []
    for transport in TRANSPORTS:
        join(transport)
        for wire in WIRES:
            plan = ray.get(trainer.__ray_call__.remote(plan_of, bucket_mb, wire))
            ray.get([r.__ray_call__.remote(hold_in, wire) for r in receivers])
            check(plan, seed=len(rows) + 1)
            paths = {"project": lambda: project(plan), "raw": raw}
            for call in [*paths.values()] * 2:  # warm-up (the check above was the first of each)
                call()
            times = {name: [] for name in paths}
            for _ in range(repeats):  # interleaved, so that load drifts hit both paths alike
                for name, call in paths.items():
                    start = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - start)
            nbytes = sum(s.numel for b in plan for s in b) * getattr(torch, wire).itemsize
            rows.append((transport, wire, nbytes, len(plan), *(statistics.median(times[n]) for n in paths)))

    what = (f"{folder}, {params / 1e6:.1f}M parameters" if args.model else
            f"Qwen3 of {params / 1e6:.1f}M parameters (hidden {model.hidden}, {model.layers} layers, "
            f"vocabulary {model.vocab:,}, tied)")
    print(f"weight sync: {what}, float32 master weights, trainer rank 0 -> generator + scorer "
          f"(pure-torch engines holding the wire dtype), gloo on CPU, buckets of {bucket_mb:g} MB; median of "
          f"{repeats} interleaved syncs after warm-up; every receiver held the sent weights exactly, the raw "
          "buffers arrived byte for byte")
    print(f"{'transport':<10} {'wire':<9} {'MB':>7} {'buckets':>7} {'project s':>10} {'raw s':>7} "
          f"{'project GB/s':>13} {'raw GB/s':>9} {'project/raw':>12}")
    for transport, wire, nbytes, buckets, mine, bare in rows:
        print(f"{transport:<10} {wire:<9} {nbytes / 1e6:>7.1f} {buckets:>7} {mine:>10.3f} {bare:>7.3f} "
              f"{nbytes / mine / 1e9:>13.2f} {nbytes / bare / 1e9:>9.2f} {mine / bare:>11.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
