"""Start-up: what a short run costs as a whole process, beside TRL's, and what warm actors save.

    python benchmarks/startup.py [--steps 50] [--repeats 1] [--small] [--trl-python PY] [--out table.json]
    python benchmarks/startup.py --warm-pool [--runs 3] [--steps 5] [--small] [--out table.json]

Whole process (the default): `copd-ray train` as a user runs it, one branch doing plain GRPO
(the config of benchmarks/grpo_vs_trl.py: --steps steps of 16 prompts x 8 samples, lockstep
and asynchronous), and TRL's GRPOTrainer on the same model, settings and prompts (that
script's TRL worker, in TRL's own virtualenv), each a fresh process from `python` to exit,
timed from outside. copd-ray's process does more than TRL's: it starts a local Ray and its
actors, saves the branch, evaluates base and branch on the held-out set and draws its plots;
TRL's trains and saves. For copd-ray the run's own marks (eval.json's `timing`, seconds
since train() was called) split the time: outside train() (the whole minus `done`: imports,
Ray's start, which overlaps them, and its stop, plots and exit), the run's data and checks,
actors up, the steps, the final evaluation. Before any time is printed every run is checked:
copd-ray's metrics hold --steps step records and TRL's worker timed --steps steps. Rows
alternate within each repeat; the table shows each row's median.

--warm-pool: the same short CoPD run (the default config) several times in one Ray session,
each starting its own actors (cold), then as many reusing the last cold run's through a
WarmPool (warm), side by side; every warm run's step records and evaluation are checked equal to the
cold run's first. The policy is the warmed-up base (`copd-ray bootstrap`, cached); `--small`
takes the untrained tiny one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def grpo_vs_trl():
    """benchmarks/grpo_vs_trl.py as a module: its one-branch config, TRL spec and base policy."""
    spec = importlib.util.spec_from_file_location("grpo_vs_trl", HERE / "grpo_vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- whole processes beside TRL ---------------------------------------------------------------

def copd_process(overrides: list[str], out: Path, steps: int) -> dict:
    """`copd-ray train` from python to exit; its whole time and the run's own marks."""
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", "from copd_ray.cli import main; main()", "train", *overrides,
                          f"output_dir={out}"], capture_output=True, text=True)
    whole = time.perf_counter() - start
    if run.returncode:
        raise RuntimeError(f"copd-ray train exited {run.returncode}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    done = sum(r["kind"] == "step" for r in records)
    if done != steps:
        raise RuntimeError(f"copd-ray ran {done} steps, not {steps}")
    t = json.loads((out / "eval.json").read_text())["timing"]
    return {"whole_s": whole, "outside_train_s": whole - t["done"], "data_s": t["ray_and_data"],
            # steps: from the actors being up (step 0's pair metrics and evaluation, if due, then the steps)
            "actors_up_s": t["actors_up"] - t["ray_and_data"], "steps_s": t["trained"] - t["actors_up"],
            "final_eval_s": t["evaluated"] - t["trained"]}


def trl_process(trl_python: str, spec_file: Path, out: Path, steps: int, threads: int) -> dict:
    """TRL's worker (grpo_vs_trl.py --trl-worker) from python to exit."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    run = subprocess.run([trl_python, str(HERE / "grpo_vs_trl.py"), "--trl-worker", str(spec_file)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    whole = time.perf_counter() - start
    if run.returncode:
        raise RuntimeError(f"the TRL worker exited {run.returncode}:\n{run.stderr[-3000:]}")
    times = json.loads((out / "result.json").read_text())["times"]
    if len(times) != steps:
        raise RuntimeError(f"TRL timed {len(times)} steps, not {steps}")
    # Its steps: the span between the first and the last step's end, over steps - 1 steps, scaled to all.
    return {"whole_s": whole, "steps_s": (times[-1] - times[0]) * steps / (steps - 1)}


def whole_processes(a: argparse.Namespace, work: Path) -> dict:
    gvt = grpo_vs_trl()
    from copd_ray.capabilities import build_capability
    from copd_ray.config import load_config

    folder = gvt.base_folder(a.small, work)
    capability = "{name: add, source: 'synthetic:add', heldout_size: 50}"
    common = gvt.one_branch_overrides(folder, capability, a.steps, 16, 8, a.threads, 1, 0)
    rows = {"copd-ray lockstep": ["schedule.max_staleness=0"], "copd-ray async": ["schedule.max_staleness=1"]}
    trl_python = a.trl_python if a.trl_python is not None else (
        gvt.DEFAULT_TRL_PYTHON if Path(gvt.DEFAULT_TRL_PYTHON).exists() else "")
    if trl_python:
        cfg = load_config(None, common)
        (work / "trl.json").write_text(json.dumps(gvt.trl_spec(
            folder, cfg, build_capability(cfg.capability("add"), cfg.seed), a.steps, 16, 8, a.threads, work / "trl")))
        rows["TRL GRPOTrainer"] = None
    print(f"policy {folder}; {a.steps} steps of 16 prompts x 8 samples; {a.threads} threads; "
          f"{a.repeats} repeat(s), rows alternating" + ("" if trl_python else "; TRL skipped (no --trl-python)"))
    measured = {name: [] for name in rows}
    for repeat in range(a.repeats):
        for name, extra in rows.items():
            if extra is None:
                measured[name].append(trl_process(trl_python, work / "trl.json", work / "trl", a.steps, a.threads))
            else:
                out = work / f"{name.replace(' ', '_')}_{repeat}"
                measured[name].append(copd_process(common + extra, out, a.steps))
            print(f"  {name}, repeat {repeat + 1}: {measured[name][-1]['whole_s']:.1f} s", flush=True)
    return {name: {k: statistics.median(m[k] for m in runs) for k in runs[0]} for name, runs in measured.items()}


def print_whole(table: dict, steps: int) -> None:
    trl = table.get("TRL GRPOTrainer", {}).get("whole_s")
    parts = ["outside_train_s", "data_s", "actors_up_s", "steps_s", "final_eval_s"]
    heads = ["outside", "data", "actors", "steps", "eval"]
    print(f"\n{'':<18} {'whole s':>8} {'x TRL':>6}" + "".join(f"{h:>10}" for h in heads))
    for name, r in table.items():
        x = f"{r['whole_s'] / trl:.2f}" if trl else "-"
        print(f"{name:<18} {r['whole_s']:8.1f} {x:>6}" + "".join(f"{r[p]:10.1f}" if p in r else f"{'':>10}"
                                                                   for p in parts))
    print("outside: before train() and after it (imports, Ray's start beside them and its stop, plots, exit); "
          "TRL's steps: the span "
          "from its first step's end to its last's, scaled by steps / (steps - 1)")
    copd, trl_row = table.get("copd-ray lockstep"), table.get("TRL GRPOTrainer")
    if copd and trl_row:
        fixed, per = copd["whole_s"] - copd["steps_s"], copd["steps_s"] / steps
        trl_fixed, trl_per = trl_row["whole_s"] - trl_row["steps_s"], trl_row["steps_s"] / steps
        even = (fixed - trl_fixed) / (trl_per - per) if trl_per > per else float("inf")
        print(f"lockstep: {fixed:.1f} s besides its steps, {per:.3f} s a step; TRL {trl_fixed:.1f} s, {trl_per:.3f} s "
              f"a step: the whole processes take equal time at ~{even:.0f} steps")


# -- warm actors in one Ray session -------------------------------------------------------

def warm_pool(a: argparse.Namespace, work: Path) -> dict:
    import ray
    from rich.console import Console

    from copd_ray.config import load_config
    from copd_ray.driver import train
    from copd_ray.runtime import WarmPool

    overrides = ["wandb.mode=disabled", f"model.path={grpo_vs_trl().base_folder(a.small, work)}", "schedule.cycles=1",
                 f"schedule.rl_steps={a.steps}", f"schedule.opd_steps={a.steps}", "schedule.save_every=0",
                 "eval.every=0", "metrics.pair_every=0"]
    ray.init(include_dashboard=False, log_to_driver=False)
    rows, reference, pool = {}, None, WarmPool()
    try:
        for mode in ("cold", "warm"):
            # The last cold run starts its actors (the pool is empty) and leaves them to the warm runs.
            for i in range(a.runs):
                out = work / f"{mode}{i}"
                summary = train(load_config(None, overrides + [f"output_dir={out}"]), console=Console(quiet=True),
                                pool=pool if mode == "warm" or i == a.runs - 1 else None)
                steps = [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "driver/"))}
                         for line in (out / "metrics.jsonl").read_text().splitlines()]
                steps = [s for s in steps if s["kind"] == "step"]
                if reference is None:
                    reference = (steps, summary["eval"])
                assert (steps, summary["eval"]) == reference, f"{mode} run {i} computed other numbers"
                rows[f"{mode} {i + 1}"] = summary["timing"]
    finally:
        pool.close()
        ray.shutdown()
    return rows


def print_warm(rows: dict) -> None:
    keys = list(next(iter(rows.values())))
    print(f"{'run':<8}" + "".join(f"{k:>14}" for k in keys))
    for name, t in rows.items():
        print(f"{name:<8}" + "".join(f"{t[k]:14.2f}" for k in keys))
    mean = lambda mode, k: statistics.fmean(t[k] for n, t in rows.items() if n.startswith(mode))  # noqa: E731
    print(f"means: actors up in {mean('cold', 'actors_up') - mean('cold', 'ray_and_data'):.1f} s cold, "
          f"{mean('warm', 'actors_up') - mean('warm', 'ray_and_data'):.1f} s warm; whole run "
          f"{mean('cold', 'done'):.1f} s cold, {mean('warm', 'done'):.1f} s warm "
          f"({mean('cold', 'done') / mean('warm', 'done'):.2f}x)")
    print("every run computed the same step records and evaluation")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warm-pool", action="store_true", help="cold against warm actors in one Ray session")
    p.add_argument("--steps", type=int, default=None, help="steps of each run (default 50; --warm-pool: 5 RL + 5 OPD)")
    p.add_argument("--repeats", type=int, default=1, help="whole processes of each row (the median is shown)")
    p.add_argument("--runs", type=int, default=3, help="--warm-pool: runs each way")
    p.add_argument("--threads", type=int, default=2, help="torch threads of TRL's process and copd-ray's driver")
    p.add_argument("--trl-python", default=None, help="TRL's python (default that of grpo_vs_trl.py, if it exists; "
                                                      "'' skips TRL)")
    p.add_argument("--small", action="store_true", help="the untrained tiny policy (no warm-up needed)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    a.steps = a.steps or (5 if a.warm_pool else 50)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(tempfile.mkdtemp(prefix="startup-"))
    try:
        if a.warm_pool:
            table = warm_pool(a, work)
            print_warm(table)
        else:
            table = whole_processes(a, work)
            print_whole(table, a.steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"mode": "warm_pool" if a.warm_pool else "whole_process", "steps": a.steps,
                                           "small": a.small, "table": table}, indent=2))


if __name__ == "__main__":
    main()
