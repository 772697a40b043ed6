"""Peak memory and step time of a trainer rank, measured, beside `copd-ray plan`'s estimate.

    python benchmarks/trainer_memory.py [--small] [--steps 2] [--phases] [--malloc-default]

A ~100M-parameter Qwen3 (hidden 768, 12 layers, 12 query / 4 key-value heads of 64, MLP
2048, vocabulary 32,000, tied embeddings) is built here from a config (no download) and
saved with the repository's char tokenizer; `copd_ray.learner.Learner` trains it in float32
on 8 synthetic GRPO rows of 32 + 96 tokens (every second row a token shorter, so batches
are padded as real ones are). Every configuration runs in fresh processes (ru_maxrss is a
lifetime peak): 1 vs 2 trainer ranks (FSDP2 over gloo, one process a rank, the batch
sharded with `TrainBatch.shard`), activation checkpointing off vs on, 1 vs 4 micro-batches
(`train.max_tokens_per_microbatch`). For each rank:

- peak: the process's lifetime peak RSS (ru_maxrss, model loading included), the way the
  plan's constants were calibrated; compared with the plan's "need" for the same setting
  (`copd_ray.plan.trainer_parts`, its CPU runtime included). "+load" is that peak minus the
  RSS just before the model is loaded (imports and the process group already there),
  compared with the plan's need less its "other" (the process itself);
- state: the bytes of the rank's own parameters, gradients and AdamW state (local shards
  of FSDP2's DTensors), counted tensor by tensor;
- step time: the median of `--steps` steps after a warm-up step (so AdamW state exists);
  one rank uses both cores, each of two ranks one;
- with --phases, the peak RSS in each phase of the last step (forward, backward, old
  log-probs, optimizer step), which is how the plan's phases were found.

Then the log-prob pass alone (forward + backward) at vocabulary 151,936 and 4,096 tokens
(hidden 768), each in a fresh process: a plain [T, V] float32 log_softmax + gather vs
`copd_ray.algo.chosen_logprobs` at chunks of 512 (an eighth of the positions) and 2048 (the
default `train.logprob_chunk_tokens`); peak RSS over the inputs and the output layer (with a
gradient, as in training), after a first pass on 4 rows.

Every process runs with MALLOC_MMAP_THRESHOLD_=65536 (as the plan's calibration did), so that
a freed tensor leaves RSS at once; `--malloc-default` leaves glibc's default.

Exit status 1 when an estimate is off by more than 25%, a step's loss is not finite, the
chunked log-probs differ from the full ones by more than 1e-5, a sharded rank's state is
not ~1/N of one rank's, or the chunked pass at an eighth of the positions is not at least 4x
smaller than the full one. `--small` (a 5M-parameter model, 64-token rows, 1,024 log-prob
positions) checks the same in about a minute and a half; the default takes about 8 minutes
on 2 cores.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from copd_ray.config import GRPOConfig, TrainConfig

GiB, MiB = 2**30, 2**20
TOLERANCE = 0.25  # |plan / measured - 1| allowed
STATE_TOLERANCE = 0.05  # a rank's state / (one rank's / N)
LOGPROB_MIN_RATIO = 4.0  # full / chunked peak of the log-prob pass
LOGPROB_ATOL = 1e-5


@dataclass(frozen=True)
class Model:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class Sizes:
    model: Model
    rows: int  # training rows a step (whole batch, before sharding)
    prompt: int
    response: int
    chunk: int  # train.logprob_chunk_tokens
    lp_vocab: int  # the log-prob pass
    lp_tokens: int
    lp_hidden: int
    lp_chunks: tuple[int, ...]  # the first is checked to be >= LOGPROB_MIN_RATIO x smaller than the full pass


# lp_chunks: an eighth of the positions, and train.logprob_chunk_tokens' default (2048).
FULL = Sizes(Model(768, 12, 12, 4, 64, 2048, 32000), rows=8, prompt=32, response=96, chunk=2048,
             lp_vocab=151_936, lp_tokens=4096, lp_hidden=768, lp_chunks=(512, 2048))
SMALL = Sizes(Model(256, 4, 4, 2, 64, 704, 8000), rows=8, prompt=32, response=32, chunk=2048,
              lp_vocab=151_936, lp_tokens=1024, lp_hidden=64, lp_chunks=(64,))

GRPO = GRPOConfig(lr=1e-5, minibatches=1, loss_agg="token_mean")


def hf_config(m: Model):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=m.vocab, hidden_size=m.hidden, intermediate_size=m.intermediate,
                       num_hidden_layers=m.layers, num_attention_heads=m.heads, num_key_value_heads=m.kv_heads,
                       head_dim=m.head_dim, tie_word_embeddings=True, max_position_embeddings=4096)


def build_folder(m: Model, folder: Path) -> int:
    """The model (random weights, float32) and the char tokenizer, saved for `Learner` to load."""
    import torch
    from transformers import Qwen3ForCausalLM

    from copd_ray.models.tiny import build_char_tokenizer

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(hf_config(m))
    tokenizer = build_char_tokenizer()
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def make_batch(s: Sizes):
    """`rows` GRPO rows of prompt + response random tokens, in groups of two (rewards 0 and 1).
    Every second row is one token shorter, so that a micro-batch of several rows is padded and
    attention takes the masked path, as in real batches."""
    import random

    from copd_ray.batch import TrainBatch

    rnd = random.Random(0)
    seqs = [[1] + [rnd.randrange(4, s.model.vocab) for _ in range(s.prompt + s.response - 1 - i % 2)]
            for i in range(s.rows)]
    return TrainBatch.of(2, seqs, [s.prompt] * s.rows, [float(i % 2) for i in range(s.rows)])


# -- one trainer rank (a fresh process) -------------------------------------------------------------


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _state_bytes(learner) -> int:
    """This rank's parameters, gradients and AdamW state: local shards, each storage once."""
    import torch

    seen, total = set(), 0

    def add(t):
        nonlocal total
        if t is None or not isinstance(t, torch.Tensor):
            return
        local = t.to_local() if hasattr(t, "to_local") else t
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape))
        if key not in seen and local.numel() > 1:
            seen.add(key)
            total += local.numel() * local.element_size()

    for p in learner.model.parameters():
        add(p)
        add(p.grad)
    for state in learner.optimizer.state.values():
        for v in state.values():
            add(v)
    return total


def _watch_phases(learner, step: list) -> dict:
    """Peak RSS in each phase of a step (backward, old log-probs, optimizer step, the rest),
    sampled every 2 ms by a thread; the phase is set by wrappers around the learner's calls."""
    import threading

    import torch

    phase, peaks = ["other"], {}

    def sample():
        with open("/proc/self/statm") as f:
            while True:
                f.seek(0)
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                key = (step[0], phase[0])
                peaks[key] = max(peaks.get(key, 0), rss)
                time.sleep(0.002)

    def wrap(obj, name, inside, after="other"):
        original = getattr(obj, name)

        def call(*a, **kw):
            phase[0] = inside(*a) if callable(inside) else inside
            try:
                return original(*a, **kw)
            finally:
                phase[0] = after

        setattr(obj, name, call)

    wrap(learner.forward, "forward", lambda *a: "forward" if torch.is_grad_enabled() else "old log-probs")
    wrap(torch.Tensor, "backward", "backward")
    wrap(learner.optimizer, "step", "optimizer step")
    threading.Thread(target=sample, daemon=True).start()
    return peaks


def trainer_rank(rank: int, world: int, port: int, folder: str, s: Sizes, ckpt: bool, budget: int | None,
                 steps: int, threads: int, phases: bool, queue) -> None:
    try:
        import datetime

        import torch.distributed as dist

        from copd_ray.batch import pack_microbatches
        from copd_ray.learner import Learner

        if world > 1:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=300))
        batch = make_batch(s).shard(rank, world)
        lengths = batch.rows.lengths.tolist()
        micro = len(pack_microbatches(list(range(len(lengths))), lengths, budget))
        import gc

        gc.collect()
        base = _vm("VmRSS:")
        train = TrainConfig(gradient_checkpointing=ckpt, max_tokens_per_microbatch=budget, logprob_chunk_tokens=s.chunk)
        learner = Learner("bench", rank, world, folder, GRPO, threads=threads, train=train)
        load_peak = _vm("VmHWM:")
        times, losses, step = [], [], [0]
        peaks = _watch_phases(learner, step) if phases else {}
        for i in range(steps + 1):
            step[0] = i
            start = time.perf_counter()
            stats = learner.train_step(batch)
            times.append(time.perf_counter() - start)
            losses.append(stats["loss"])
            if stats["nan_skipped"] or not math.isfinite(stats["grad_norm"]):
                losses.append(math.nan)
        state = _state_bytes(learner)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        last = {p: v - base for (i, p), v in list(peaks.items()) if i == steps}  # the last step's
        queue.put(dict(rank=rank, base=base, load_peak=load_peak, peak=peak, state=state, times=times[1:],
                       losses=losses, micro=micro, rows=len(lengths), phases=last))
        if world > 1:
            dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails
        import traceback

        queue.put(dict(rank=rank, error=f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


# -- the log-prob pass (a fresh process) ------------------------------------------------------------


def logprob_pass(mode: str, chunk: int, s: Sizes, out: str, queue) -> None:
    try:
        import gc

        import torch

        from copd_ray.algo import chosen_logprobs

        torch.set_num_threads(2)
        g = torch.Generator().manual_seed(0)
        head = torch.nn.Linear(s.lp_hidden, s.lp_vocab, bias=False)
        with torch.no_grad():
            head.weight.copy_(torch.randn(s.lp_vocab, s.lp_hidden, generator=g) * s.lp_hidden**-0.5)
        hidden = torch.randn(s.lp_tokens, s.lp_hidden, generator=g).requires_grad_(True)
        targets = torch.randint(0, s.lp_vocab, (s.lp_tokens,), generator=g)
        # Both passes once on a few rows first: the first activation checkpoint imports and
        # allocates ~0.1 GB of its own, which is the process's, not the pass's.
        few = hidden[:4].detach().requires_grad_(True)
        chosen_logprobs(head, few, targets[:4], 2)[0].sum().backward()
        torch.log_softmax(head(few).float(), dim=-1).sum().backward()
        head.weight.grad = torch.zeros_like(head.weight)
        gc.collect()
        base = _vm("VmRSS:")
        start = time.perf_counter()
        if mode == "full":
            logits = head(hidden).float()
            lp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            del logits
        else:
            lp, _, _ = chosen_logprobs(head, hidden, targets, chunk)
        lp.sum().backward()
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        torch.save({"lp": lp.detach(), "grad": hidden.grad}, out)
        queue.put(dict(base=base, peak=peak, seconds=seconds))
    except BaseException as e:  # noqa: BLE001
        import traceback

        queue.put(dict(error=f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


# -- running them ---------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(target, argsets: list[tuple], timeout: float) -> list[dict]:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, queue)) for a in argsets]
    for p in procs:
        p.start()
    results = []
    deadline = time.monotonic() + timeout
    try:
        for _ in procs:
            results.append(queue.get(timeout=max(1.0, deadline - time.monotonic())))
            if "error" in results[-1]:
                break  # the other ranks would wait in a collective until their timeout
    except Exception:  # noqa: BLE001 - queue.Empty: a hung or dead process
        results.append(dict(error=f"no result within {timeout:.0f} s"))
    failed = any("error" in r for r in results)
    for p in procs:
        p.join(timeout=1 if failed else 30)
        if p.is_alive():
            p.kill()
            p.join()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError("\n".join(errors))
    return results


@dataclass
class TrainerRow:
    ranks: int
    ckpt: bool
    micro: int
    budget: int | None
    tokens: int  # a rank's tokens a step
    seconds: float
    state: int  # a rank's parameter + gradient + optimizer bytes (the largest rank)
    peak: int  # the largest rank's lifetime peak RSS
    added: int  # the largest rank's peak minus its RSS before the model was loaded
    plan_need: int
    plan_other: int
    losses_ok: bool
    phases: dict  # the last step's peak RSS over the pre-load RSS, by phase (--phases)
    plan_phase: str  # where the plan puts the peak

    @property
    def ratio(self) -> float:
        return self.plan_need / self.peak

    @property
    def added_ratio(self) -> float:
        return (self.plan_need - self.plan_other) / self.added


def plan_estimate(s: Sizes, ranks: int, ckpt: bool, budget: int | None) -> tuple[dict, str]:
    """`copd-ray plan`'s trainer-rank estimate for the same model, rows and knobs (CPU, float32)."""
    from copd_ray.config import load_config
    from copd_ray.plan import TrainerKnobs, Workload, architecture_from_hf, trainer_parts

    cfg = load_config(None, ["model.dtype=float32", "grpo.minibatches=1", "grpo.kl_coef=0"])
    arch = architecture_from_hf(hf_config(s.model), "benchmark model")
    w = Workload(s.prompt, s.response, s.rows, 1, 1)
    return trainer_parts(cfg, arch, w, TrainerKnobs(ranks, ckpt, budget, s.chunk, 0.0), on_gpu=False)


def run_trainer(s: Sizes, folder: str, ranks: int, ckpt: bool, micro_target: int, steps: int,
                phases: bool = False) -> TrainerRow:
    rows_per_rank = s.rows // ranks
    seq = s.prompt + s.response
    budget = None if micro_target == 1 else max(1, rows_per_rank // micro_target) * seq
    threads = max(1, (os.cpu_count() or 2) // ranks)
    port = _free_port()
    results = _spawn(trainer_rank, [(r, ranks, port, folder, s, ckpt, budget, steps, threads, phases)
                                    for r in range(ranks)], timeout=900)
    results.sort(key=lambda r: r["rank"])
    worst = max(results, key=lambda r: r["peak"])
    parts, detail = plan_estimate(s, ranks, ckpt, budget)
    losses_ok = all(math.isfinite(x) for r in results for x in r["losses"])
    return TrainerRow(ranks, ckpt, results[0]["micro"], budget, results[0]["rows"] * seq,
                      statistics.median(results[0]["times"]), max(r["state"] for r in results), worst["peak"],
                      worst["peak"] - worst["base"], sum(parts.values()), parts["other"], losses_ok,
                      worst["phases"], detail.rsplit("peak: ", 1)[-1])


@dataclass
class LogprobRow:
    mode: str
    chunk: int | None
    added: int
    seconds: float
    estimate: int


def run_logprobs(s: Sizes, workdir: Path) -> tuple[list[LogprobRow], float, float]:
    """The full pass, then each chunk; (rows, largest log-prob difference, largest gradient difference)."""
    import torch

    from copd_ray.plan import LOGPROB_FLOAT32_COPIES

    rows, outs = [], []
    for mode, chunk in [("full", s.lp_tokens)] + [("chunked", c) for c in s.lp_chunks]:
        out = str(workdir / f"lp_{mode}_{chunk}.pt")
        r = _spawn(logprob_pass, [(mode, chunk, s, out)], timeout=600)[0]
        outs.append(torch.load(out))
        # The plan's: float32 [chunk, V] copies (its "logprobs" part) + the output layer's
        # float32 gradient (which it counts with the gradients).
        estimate = chunk * s.lp_vocab * 4 * LOGPROB_FLOAT32_COPIES + s.lp_vocab * s.lp_hidden * 4
        rows.append(LogprobRow(mode, None if mode == "full" else chunk, r["peak"] - r["base"], r["seconds"], estimate))
    lp_diff = max((outs[0]["lp"] - o["lp"]).abs().max().item() for o in outs[1:])
    grad_diff = max((outs[0]["grad"] - o["grad"]).abs().max().item() for o in outs[1:])
    return rows, lp_diff, grad_diff


# -- the table ------------------------------------------------------------------------------------


def _gib(b: float) -> str:
    return f"{b / GiB:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a small model and short rows (about a minute)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after the warm-up (default 2)")
    parser.add_argument("--malloc-default", action="store_true", help="leave glibc's mmap threshold as it is")
    parser.add_argument("--skip-logprobs", action="store_true", help="the trainer table only")
    parser.add_argument("--phases", action="store_true",
                        help="also the peak RSS of each phase of the last step (a sampler thread every 2 ms)")
    args = parser.parse_args(argv)
    s = SMALL if args.small else FULL
    steps = args.steps or 2
    if not args.malloc_default:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by every spawned process
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

    failures: list[str] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="trainer_memory_") as tmp:
        folder = Path(tmp) / "model"
        params = build_folder(s.model, folder)
        m = s.model
        print(f"model: Qwen3, {params / 1e6:.1f}M parameters (hidden {m.hidden}, {m.layers} layers, {m.heads}/"
              f"{m.kv_heads} heads of {m.head_dim}, MLP {m.intermediate}, vocabulary {m.vocab:,}, tied), float32, CPU")
        print(f"batch: {s.rows} GRPO rows of {s.prompt} prompt + {s.response} response tokens, one minibatch, "
              f"log-prob chunk {s.chunk}; {steps} timed steps after a warm-up; "
              f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'default')}")
        trainer: list[TrainerRow] = []
        for ranks in (1, 2):
            for ckpt in (False, True):
                for micro in (1, 4):
                    trainer.append(run_trainer(s, str(folder), ranks, ckpt, micro, steps, args.phases))
        logprobs, lp_diff, grad_diff = ([], 0.0, 0.0) if args.skip_logprobs else run_logprobs(s, Path(tmp))

    print()
    print("trainer rank (the largest of its ranks): measured peak RSS vs copd-ray plan's estimate, GiB")
    head = (f"{'ranks':>5} {'ckpt':>4} {'micro':>5} {'tokens':>6} {'step s':>7} {'state':>6} {'peak':>6} "
            f"{'plan':>6} {'plan/peak':>9} {'+load':>6} {'plan-other':>10} {'ratio':>6}")
    print(head)
    print("-" * len(head))
    for r in trainer:
        print(f"{r.ranks:>5} {'on' if r.ckpt else 'off':>4} {r.micro:>5} {r.tokens:>6} {r.seconds:>7.2f} "
              f"{_gib(r.state):>6} {_gib(r.peak):>6} {_gib(r.plan_need):>6} {r.ratio:>9.2f} {_gib(r.added):>6} "
              f"{_gib(r.plan_need - r.plan_other):>10} {r.added_ratio:>6.2f}")
        what = f"{r.ranks} rank(s), checkpointing {'on' if r.ckpt else 'off'}, {r.micro} micro-batch(es)"
        if abs(r.ratio - 1) > TOLERANCE:
            failures.append(f"{what}: plan {_gib(r.plan_need)} GiB vs measured peak {_gib(r.peak)} GiB "
                            f"({r.ratio:.2f}x)")
        if not r.losses_ok:
            failures.append(f"{what}: a step's loss or gradient norm was not finite")

    if args.phases:
        print()
        print("peak RSS over the pre-load RSS in each phase of the last step, MiB (the largest rank); the plan's "
              "peak phase")
        names = ("forward", "backward", "old log-probs", "optimizer step", "other")
        head = f"{'ranks':>5} {'ckpt':>4} {'micro':>5} {'state':>6} " + " ".join(f"{n:>14}" for n in names)
        print(head + "  plan's peak")
        print("-" * (len(head) + 13))
        for r in trainer:
            print(f"{r.ranks:>5} {'on' if r.ckpt else 'off':>4} {r.micro:>5} {r.state / MiB:>6.0f} "
                  + " ".join(f"{r.phases.get(n, 0) / MiB:>14.0f}" for n in names) + f"  {r.plan_phase}")

    print()
    print("2 ranks vs 1 rank, per rank")
    head = f"{'ckpt':>4} {'micro':>5} {'state 2/1':>9} {'peak 2/1':>8} {'+load 2/1':>9} {'step s 2/1':>10}"
    print(head)
    print("-" * len(head))
    by = {(r.ranks, r.ckpt, r.micro > 1): r for r in trainer}
    for ckpt in (False, True):
        for multi in (False, True):
            one, two = by[(1, ckpt, multi)], by[(2, ckpt, multi)]
            state = two.state / one.state
            print(f"{'on' if ckpt else 'off':>4} {'4' if multi else '1':>5} {state:>9.3f} {two.peak / one.peak:>8.2f} "
                  f"{two.added / one.added:>9.2f} {two.seconds / one.seconds:>10.2f}")
            if abs(state * 2 - 1) > STATE_TOLERANCE:
                failures.append(f"parameters + gradients + AdamW state of a rank of 2: {state:.3f} of one rank's "
                                "(expected 1/2)")

    if logprobs:
        print()
        print(f"log-prob pass, forward + backward: {s.lp_tokens:,} tokens, vocabulary {s.lp_vocab:,}, hidden "
              f"{s.lp_hidden} (peak RSS over the inputs and the output layer with its gradient)")
        head = (f"{'pass':>8} {'chunk':>6} {'peak +MiB':>9} {'plan MiB':>8} {'plan/peak':>9} {'seconds':>8} "
                f"{'full/this':>9}")
        print(head)
        print("-" * len(head))
        full = next(r for r in logprobs if r.mode == "full")
        for r in logprobs:
            print(f"{r.mode:>8} {r.chunk or s.lp_tokens:>6} {r.added / MiB:>9.0f} {r.estimate / MiB:>8.0f} "
                  f"{r.estimate / r.added:>9.2f} {r.seconds:>8.2f} {full.added / r.added:>9.2f}")
        print(f"chunked vs full: log-probs differ by at most {lp_diff:.2e}, hidden-state gradients by {grad_diff:.2e}")
        if lp_diff > LOGPROB_ATOL or grad_diff > LOGPROB_ATOL:
            failures.append(f"chunked log-probs differ from the full log_softmax by {lp_diff:.2e} (gradients "
                            f"{grad_diff:.2e}); allowed {LOGPROB_ATOL:g}")
        chunked = next(r for r in logprobs if r.mode == "chunked")  # an eighth (or less) of the positions
        if full.added / chunked.added < LOGPROB_MIN_RATIO:
            failures.append(f"the chunked log-prob pass (chunk {chunked.chunk}) is only "
                            f"{full.added / chunked.added:.1f}x smaller than the full one (expected >= "
                            f"{LOGPROB_MIN_RATIO:g}x)")

    print()
    print(f"total {time.perf_counter() - started:.0f} s")
    for f in failures:
        print(f"FAIL: {f}")
    if not failures:
        print(f"ok: every estimate within {TOLERANCE:.0%} of the measured peak; losses finite; chunked log-probs "
              "equal the full ones")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
