"""copd-ray's GRPO (one branch, lockstep and asynchronous) vs TRL's GRPOTrainer, back to
back in one run: seconds per step, rollouts/s, the ratio to TRL, and held-out greedy pass@1
after the same number of steps (so that speed is not bought with learning).

    python benchmarks/grpo_vs_trl.py [--steps 50] [--prompts 16] [--group 8] [--threads 2]
        [--actor-threads 1] [--heldout 500] [--trl-python /tmp/trl-bench/venv/bin/python]
        [--out table.json] [--small | --smollm2] [--seed 0] [--rows sync,async,whole,trl]

TRL is not a dependency of copd-ray: install it in a virtualenv of its own (torch pinned
first, as everywhere here), then give its python as --trl-python (default: that path, if it
exists; without one the TRL row is skipped and the table says so):

    python3 -m venv /tmp/trl-bench/venv
    /tmp/trl-bench/venv/bin/pip install torch==2.13.0
    /tmp/trl-bench/venv/bin/pip install trl==1.16.0 transformers==5.19.0 "math-verify>=0.7" torch==2.13.0

The TRL row runs in that python as `grpo_vs_trl.py --trl-worker SPEC.json`, with the repo
on its path for the project's verifier (copd_ray.rewards). The policy is the project's
warmed-up base (`copd-ray bootstrap`, cached; built the first time, which takes minutes);
`--small` takes the untrained tiny policy, 6 steps and 50 held-out problems, a quick check
of the mechanics only (its pass@1 is ~0). `--smollm2` takes the real SmolLM2-135M-Instruct
(the smollm2 extra, imported once) on configs/smollm2.yaml's `times` capability: chat prompts
with its system prompt (TRL gets them as conversations and applies the same chat template;
the worker checks the token ids), the math reward on the stated final answer, T=0.7, 64 new
tokens, lr 1e-5; by default 10 steps of 4 prompts x 6 samples, 100 held-out problems.

Matched, row for row: the model folder; the prompts (the stream a copd-ray branch named add
draws, in order; the worker checks that TRL reads the same token ids); P prompts x G samples
a step at T=1, top_p=1, no top-k, up to grpo.max_new_tokens; the project's verifier on the
decoded completion; group-normalised advantages; clip 0.2/0.28; a token-mean loss over the
whole step (copd-ray grpo.loss_agg=token_mean; TRL loss_type="dapo", over the active tokens
of the accumulated batch, which is the step); one optimizer step a step (grpo.minibatches=1;
TRL num_iterations=1, the whole step per device, gradient_accumulation_steps=1); AdamW, lr
1e-4 constant, no weight decay, grad-norm clip 1; no reference model (TRL beta=0); float32;
one forward with and one backward per step: TRL's default gradient checkpointing (a
recomputing forward) is off, as copd-ray's is, and with one optimizer step a step both take
the old log-probs from that forward, detached (TRL's num_iterations=1; copd-ray's
grpo.minibatches=1, in both modes: the weights that take the step are the old ones; in async
mode the rollouts are a version behind and copd-ray weights each token by the truncated
importance weight against their log-probs, grpo.is_cap). --threads are the torch threads of
TRL's process and copd-ray's driver, --actor-threads those of each copd-ray actor.

Where the work differs (this is where copd-ray's speed comes from, besides overlapping
generation with the update in async mode): copd-ray reads each prompt once for its G samples,
in sampling (the hf engine copies the prompt's KV cache to each sample, as vLLM's prefix cache
does) and in the update (train.share_prompts: the prompt's one pass, the responses on copies of
its cache, gradients flowing back through them), where TRL reads each of the G copies whole;
the row "copd-ray async, whole rows" runs with train.share_prompts=false to show that part.
Also differs: the advantage eps (copd-ray 1e-6, TRL 1e-4); TRL samples with `model.generate`
in its one process, copd-ray with its KV-cached engine in a generator actor and broadcasts the
new weights to it every step.

Timing: a step takes the wall time between two consecutive finished steps (copd-ray: its
step record appearing in `<output_dir>/metrics.jsonl`, polled every millisecond; TRL: a
callback's `on_step_end`), so it holds everything a step costs (generation, reward, update,
weight sync, overlapped or not) and no start-up or final evaluation. s/step is the median
over the steps after the first --skip (mean s: their mean), rollouts/s is P x G over it.
reward: the mean training reward of the last 10 steps; pass@1: greedy, on the same first
--heldout problems, evaluated here after training with the same code for every row
(copd_ray.evaluation.evaluate). load: the 1-minute load average after the row; above the
core count (a run's own Ray processes make it ~2.5), something else shared the cores and the
times are not to be trusted.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRL_PYTHON = "/tmp/trl-bench/venv/bin/python"


# -- the TRL side (runs in the TRL virtualenv) ---------------------------------------------

def trl_worker(spec_file: str) -> None:
    s = json.loads(Path(spec_file).read_text())
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(s["threads"])
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from copd_ray.rewards import get_reward

    tokenizer = AutoTokenizer.from_pretrained(s["model"])
    rows = s["prompts"]

    def trl_ids(prompt) -> list[int]:  # as GRPOTrainer tokenizes a text or a conversational prompt
        if isinstance(prompt, str):
            return tokenizer(prompt)["input_ids"]
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])

    mismatched = [r["prompt"] for r in rows if trl_ids(r["prompt"]) != r["ids"]]
    assert not mismatched, f"TRL would read other token ids than copd-ray for {mismatched[:3]}"
    reward = get_reward(s["reward"])

    def verifier(prompts, completions, answer, **_):
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # a conversation's reply
        return [reward(t, a) for t, a in zip(texts, answer)]

    times = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    args = GRPOConfig(
        output_dir=s["out"], max_steps=s["steps"], per_device_train_batch_size=s["prompts_per_step"] * s["group"],
        gradient_accumulation_steps=1, steps_per_generation=1, num_generations=s["group"], num_iterations=1,
        beta=0.0, loss_type="dapo", scale_rewards="group", epsilon=s["clip_low"], epsilon_high=s["clip_high"],
        learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=s["grad_clip"], max_completion_length=s["max_new_tokens"], temperature=s["temperature"],
        top_p=s["top_p"], top_k=0, shuffle_dataset=False, seed=s["seed"], use_cpu=True, bf16=False,
        gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=10, disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(s["model"], dtype=torch.float32)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    trainer = GRPOTrainer(model=model, reward_funcs=verifier, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    trainer.save_model(s["out"] + "/model")
    tokenizer.save_pretrained(s["out"] + "/model")
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]  # each the mean of 10 steps
    Path(s["out"], "result.json").write_text(json.dumps({"times": times, "reward_last10": rewards[-1],
                                                         "version": trl.__version__}))


# -- the copd-ray side ----------------------------------------------------------------------

class StepClock(threading.Thread):
    """perf_counter() when each `kind: step` record appears in metrics.jsonl, and the record."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.times, self.records, self.done = path, [], [], threading.Event()

    def run(self) -> None:
        pos, tail, last = 0, "", False
        while not last:
            last = self.done.is_set()  # one more look after the run ends
            if self.path.exists() and self.path.stat().st_size > pos:
                with self.path.open() as f:
                    f.seek(pos)
                    tail += f.read()
                    pos = f.tell()
                now = time.perf_counter()
                *lines, tail = tail.split("\n")
                for record in (json.loads(line) for line in lines if line):
                    if record.get("kind") == "step":
                        self.times.append(now)
                        self.records.append(record)
            time.sleep(0.001)


def run_copd(overrides: list[str], out: Path) -> tuple[list[float], list[dict], str, float]:
    """(step finish times, step records, final model folder, pass@1 the run's own evaluation gave)."""
    from rich.console import Console

    from copd_ray.config import load_config
    from copd_ray.driver import train

    clock = StepClock(out / "metrics.jsonl")
    clock.start()
    try:
        summary = train(load_config(None, [*overrides, f"output_dir={out}"]), console=Console(quiet=True))
    finally:
        clock.done.set()
        clock.join()
    return clock.times, clock.records, summary["models"]["branch:add"], summary["eval"]["branch:add"]["add"]


def heldout_pass(folder: str, cap, cfg) -> float:
    from copd_ray.engines import HFEngine
    from copd_ray.evaluation import evaluate
    from copd_ray.models.loading import load_policy

    model, tokenizer = load_policy(folder)
    engine = HFEngine(model.eval(), tokenizer.eos_token_id, tokenizer.pad_token_id, cfg.engine.max_batch_size)
    return evaluate(engine, tokenizer, cap.heldout, cap.reward, cap.template, cfg.eval.max_new_tokens)["pass_rate"]


def step_stats(times: list[float], skip: int, rollouts: int) -> dict:
    gaps = [b - a for a, b in zip(times, times[1:])][max(skip - 1, 0):]
    median = statistics.median(gaps)
    return {"steps_timed": len(gaps), "s_per_step": median, "mean_s_per_step": statistics.mean(gaps),
            "rollouts_per_s": rollouts / median}


def base_folder(small: bool, work: Path) -> str:
    """The untrained tiny policy, saved under `work` (small), or the default config's warmed-up
    base (`copd-ray bootstrap`, cached; its cache key covers the default capabilities)."""
    from copd_ray.config import load_config
    from copd_ray.bootstrap import ensure_base_policy

    if small:
        from copd_ray.models import build_char_tokenizer, build_tiny_policy, save_policy

        tokenizer = build_char_tokenizer()
        return str(save_policy(build_tiny_policy(tokenizer, seed=0), tokenizer, work / "tiny"))
    return str(ensure_base_policy(load_config(None, ["wandb.mode=disabled"]))[0])


def one_branch_overrides(folder: str, capability: str, steps: int, prompts: int, group: int, threads: int,
                         actor_threads: int, seed: int, extra: list[str] = ()) -> list[str]:
    """The config of one copd-ray branch doing plain GRPO on `capability`, matched to TRL's run."""
    return [
        "wandb.mode=disabled", f"model.path={folder}", f"num_threads={threads}", f"seed={seed}",
        f"capabilities=[{capability}]", "branches=[{name: add}]",
        "topology.kind=none", "schedule.cycles=1", f"schedule.rl_steps={steps}", "schedule.opd_steps=0",
        "schedule.save_every=0", f"grpo.prompts_per_step={prompts}", f"grpo.group_size={group}",
        "grpo.minibatches=1", "grpo.loss_agg=token_mean", "eval.every=0",
        "metrics.pair_every=0", f"resources.actor_threads={actor_threads}", *extra]


def trl_spec(folder: str, cfg, cap, steps: int, prompts: int, group: int, threads: int, out: Path) -> dict:
    """What the TRL worker runs: the same model, settings and prompts (the stream a copd-ray
    branch named add draws, in order, as text and as the token ids it reads)."""
    from copd_ray.data import encode_prompt
    from copd_ray.models.loading import load_policy

    tokenizer, g = load_policy(folder)[1], cfg.grpo
    return {"model": folder, "out": str(out), "steps": steps, "prompts_per_step": prompts,
            "group": group, "threads": threads, "reward": cap.reward_name, "seed": cfg.seed, "lr": g.lr,
            "clip_low": g.clip_low, "clip_high": g.clip_high, "grad_clip": g.grad_clip,
            "max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p,
            "prompts": [{"prompt": r.messages or cap.template.format(prompt=r.prompt), "answer": r.answer,
                         "ids": encode_prompt(r, tokenizer, cap.template)}
                        for r in cap.fork("/add").sample(steps * prompts)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="training steps per row (default 50; --small 6)")
    p.add_argument("--skip", type=int, default=None, help="first steps left out of the timing (default 5; --small 2)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--actor-threads", type=int, default=1)
    p.add_argument("--heldout", type=int, default=None, help="held-out problems (default 500; --small 50)")
    p.add_argument("--trl-python", default=None, help=f"TRL's python (default {DEFAULT_TRL_PYTHON}; '' skips TRL)")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    p.add_argument("--small", action="store_true", help="untrained tiny policy, few steps: mechanics only")
    p.add_argument("--smollm2", action="store_true", help="the real SmolLM2-135M-Instruct on word problems")
    p.add_argument("--seed", type=int, default=0, help="the run's seed (data order, sampling, the update's shuffling)")
    p.add_argument("--rows", default="sync,async,whole,trl",
                   help="which rows to run, comma-separated: sync, async, whole (async with whole rows), trl")
    p.add_argument("--trl-worker", metavar="SPEC", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.trl_worker:
        return trl_worker(a.trl_worker)
    steps = a.steps or (6 if a.small else 10 if a.smollm2 else 50)
    skip = a.skip if a.skip is not None else (2 if a.small or a.smollm2 else 5)
    heldout = a.heldout or (50 if a.small else 100 if a.smollm2 else 500)
    if a.smollm2 and (a.prompts, a.group) == (16, 8):  # the defaults: the demo's shape instead
        a.prompts, a.group = 4, 6
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch

    from copd_ray.capabilities import build_capability
    from copd_ray.config import load_config
    from copd_ray.bootstrap import ensure_base_policy

    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="grpo-vs-trl-"))
    atexit.register(shutil.rmtree, work, True)  # the runs' folders and models
    capability = f"{{name: add, source: 'synthetic:add', heldout_size: {heldout}}}"
    real = []  # the real model's settings
    if a.small:
        folder = base_folder(True, work)
    elif a.smollm2:
        demo = load_config(REPO / "configs" / "smollm2.yaml")
        folder = str(ensure_base_policy(demo)[0])
        system = demo.capability("times").system.replace('"', '\\"')
        capability = (f"{{name: add, source: 'synthetic:word_times', heldout_size: {heldout}, reward: math, "
                      f"system: \"{system}\"}}")
        real = [f"grpo.temperature={demo.grpo.temperature}", f"grpo.max_new_tokens={demo.grpo.max_new_tokens}",
                f"grpo.lr={demo.grpo.lr}", f"eval.max_new_tokens={demo.eval.max_new_tokens}",
                f"engine.max_batch_size={demo.engine.max_batch_size}",
                f"train.logprob_chunk_tokens={demo.train.logprob_chunk_tokens}"]
    else:
        folder = base_folder(False, work)
    common = one_branch_overrides(folder, capability, steps, a.prompts, a.group, a.threads, a.actor_threads, a.seed,
                                  real)
    cfg = load_config(None, common)
    g, cap = cfg.grpo, build_capability(cfg.capability("add"), cfg.seed)
    rollouts = a.prompts * a.group
    kind = "untrained, --small" if a.small else "SmolLM2-135M-Instruct, --smollm2" if a.smollm2 else "warmed-up base"
    print(f"policy {folder} ({kind}); {steps} steps of "
          f"{a.prompts} prompts x {a.group} samples, up to {g.max_new_tokens} new tokens; {a.threads} threads "
          f"(copd-ray actors {a.actor_threads} each); timing: median of steps {skip + 1}..{steps}; "
          f"held-out pass@1 on {len(cap.heldout)} {cfg.capabilities[0].source} problems")
    rows = {"base (no training)": {"pass@1": heldout_pass(folder, cap, cfg)}}
    notes = []

    def timed(times: list[float], reward_last10: float, model: str, start: float, **extra) -> dict:
        return {**step_stats(times, skip, rollouts), "reward_last10": reward_last10,
                "pass@1": heldout_pass(model, cap, cfg),
                "wall_s": time.perf_counter() - start, "load_1min": os.getloadavg()[0], **extra}

    chosen = set(a.rows.split(","))
    for key, name, extra in (("sync", "copd-ray sync", ["schedule.max_staleness=0"]),
                             ("async", "copd-ray async", ["schedule.max_staleness=1"]),
                             ("whole", "copd-ray async, whole rows",
                              ["schedule.max_staleness=1", "train.share_prompts=false"])):
        if key not in chosen:
            continue
        start = time.perf_counter()
        try:
            times, records, model, own = run_copd([*common, *extra], work / name.replace(" ", "_").replace(",", ""))
            # run_pass: the run's own final evaluation (the same problems, in a Ray task); phases: the
            # medians of the step records' times (generation overlaps the update in async mode)
            phases = {k: statistics.median(r[f"time/{k}"] for r in records[skip:])
                      for k in ("generate", "train", "sync")}
            rows[name] = timed(times, statistics.mean(r["reward_mean"] for r in records[-10:]), model, start,
                               run_pass=own, phases=phases)
        except Exception:
            traceback.print_exc()
            rows[name] = {"error": traceback.format_exc().strip().splitlines()[-1]}

    trl_python = a.trl_python if a.trl_python is not None else (
        DEFAULT_TRL_PYTHON if Path(DEFAULT_TRL_PYTHON).exists() else "")
    if "trl" not in chosen:
        notes.append("TRL: not among --rows")
    elif not trl_python:
        notes.append("TRL: skipped (--trl-python '' given)" if a.trl_python is not None else
                     f"TRL: skipped (no --trl-python given and {DEFAULT_TRL_PYTHON} does not exist)")
    else:
        # The prompts a copd-ray branch named add draws, in order, as text and as the ids it reads.
        (work / "trl.json").write_text(json.dumps(trl_spec(folder, cfg, cap, steps, a.prompts, a.group, a.threads,
                                                           work / "trl")))
        start = time.perf_counter()
        done = subprocess.run([trl_python, __file__, "--trl-worker", str(work / "trl.json")], capture_output=True,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
        if done.returncode:
            print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
            rows["TRL GRPOTrainer"] = {"error": f"the TRL worker exited {done.returncode} (its output above)"}
        else:
            result = json.loads((work / "trl" / "result.json").read_text())
            rows["TRL GRPOTrainer"] = timed(result["times"], result["reward_last10"], str(work / "trl" / "model"),
                                            start, trl_version=result["version"])
            notes.append(f"TRL {result['version']} ({trl_python})")

    trl_rate = rows.get("TRL GRPOTrainer", {}).get("rollouts_per_s")
    print(f"\n{'':<26} {'s/step':>8} {'mean s':>8} {'rollouts/s':>11} {'x TRL':>6} {'reward':>7} {'pass@1':>7} "
          f"{'load':>5}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<26} failed: {r['error']}")
            continue
        if "s_per_step" in r:
            r["x_trl"] = r["rollouts_per_s"] / trl_rate if trl_rate else None
            x = f"{r['x_trl']:.2f}" if trl_rate else "-"
            print(f"{name:<26} {r['s_per_step']:8.3f} {r['mean_s_per_step']:8.3f} {r['rollouts_per_s']:11.1f} "
                  f"{x:>6} {r['reward_last10']:7.3f} {r['pass@1']:7.3f} {r['load_1min']:5.1f}")
        else:
            print(f"{name:<26} {'':8} {'':8} {'':11} {'':6} {'':7} {r['pass@1']:7.3f}")
    notes.append("reward: mean training reward of the last 10 steps; pass@1: greedy, held out, after training "
                 f"(standard error at {len(cap.heldout)} problems: up to {(0.25 / len(cap.heldout)) ** 0.5:.3f})")
    notes.append(f"load: the 1-minute load average after the row ({os.cpu_count()} cores); well above the "
                 "cores, something else shared them")
    for name, r in rows.items():
        if "phases" in r:
            print(f"{name}: median " + ", ".join(f"{k} {v:.3f} s" for k, v in r["phases"].items()))
    for note in notes:
        print(note)
    trl_pass = rows.get("TRL GRPOTrainer", {}).get("pass@1")
    for name, r in rows.items():  # speed must not be bought with learning, nor the reverse
        if trl_pass is not None and "s_per_step" in r and name != "TRL GRPOTrainer":
            n, p = len(cap.heldout), r["pass@1"]
            se = ((p * (1 - p) + trl_pass * (1 - trl_pass)) / n) ** 0.5
            r["pass_differs_from_trl"] = abs(p - trl_pass) > 2 * se
            if r["pass_differs_from_trl"]:
                print(f"FLAG {name}: pass@1 {p:.3f} vs TRL's {trl_pass:.3f}, more than two standard errors "
                      f"({2 * se:.3f}) apart")
    if trl_rate and "rollouts_per_s" in rows.get("copd-ray async", {}):
        x = rows["copd-ray async"]["x_trl"]
        print(f"goal copd-ray async >= 1.5x TRL rollouts/s: {x:.2f}x, {'met' if x >= 1.5 else 'NOT met'}")
    if a.out:
        Path(a.out).write_text(json.dumps({"settings": {"steps": steps, "skip": skip, "prompts": a.prompts,
                                                        "group": a.group, "threads": a.threads,
                                                        "actor_threads": a.actor_threads, "heldout": len(cap.heldout),
                                                        "seed": a.seed, "rows": a.rows,
                                                        "model": folder, "small": a.small},
                                           "rows": rows, "notes": notes}, indent=2))
    if any("error" in r for r in rows.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
