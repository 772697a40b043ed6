"""Where a short run's wall time goes, and what warm actors save: the same short run three
times in one Ray session, each starting its own actors (cold) and then reusing the last run's
through a WarmPool (warm), side by side.

    python benchmarks/startup.py [--runs 3] [--steps 5] [--out table.json] [--small]

Each row is one run's `timing` from its eval.json (seconds since train() was called):
ray_and_data (Ray joined, data and base policy ready), actors_up (every branch's actors up
and wired), trained (the last step and the branches saved), evaluated (merge and the final
evaluation on the generators done), done. Before timing, every warm run's step records and
evaluation are checked against the cold run's (they must be the same numbers). The policy
is the warmed-up base (`copd-ray bootstrap`, cached); `--small` takes the untrained tiny one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="RL steps and OPD steps of each run")
    p.add_argument("--out", default=None)
    p.add_argument("--small", action="store_true", help="the untrained tiny policy (no warm-up needed)")
    a = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from rich.console import Console

    from copd_ray.config import load_config
    from copd_ray.driver import train
    from copd_ray.models.bootstrap import ensure_base_policy
    from copd_ray.runtime import WarmPool

    work = Path(tempfile.mkdtemp(prefix="startup-"))
    if a.small:
        from copd_ray.models import build_char_tokenizer, build_tiny_policy, save_policy

        tokenizer = build_char_tokenizer()
        base = str(save_policy(build_tiny_policy(tokenizer, seed=0), tokenizer, work / "tiny"))
    else:
        base = str(ensure_base_policy(load_config(None, ["wandb.mode=disabled"]))[0])
    overrides = ["wandb.mode=disabled", f"model.path={base}", "schedule.cycles=1", f"schedule.rl_steps={a.steps}",
                 f"schedule.opd_steps={a.steps}", "schedule.save_every=0", "eval.every=0", "metrics.pair_every=0"]
    ray.init(include_dashboard=False, log_to_driver=False)
    rows, reference = {}, None
    try:
        for mode in ("cold", "warm"):
            pool = WarmPool() if mode == "warm" else None
            try:
                for i in range(a.runs):
                    out = work / f"{mode}{i}"
                    summary = train(load_config(None, overrides + [f"output_dir={out}"]), console=Console(quiet=True),
                                    pool=pool)
                    steps = [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "driver/"))}
                             for line in (out / "metrics.jsonl").read_text().splitlines()]
                    steps = [s for s in steps if s["kind"] == "step"]
                    if reference is None:
                        reference = (steps, summary["eval"])
                    assert (steps, summary["eval"]) == reference, f"{mode} run {i} computed other numbers"
                    rows[f"{mode} {i + 1}"] = summary["timing"]
            finally:
                if pool is not None:
                    pool.close()
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    keys = list(next(iter(rows.values())))
    print(f"{'run':<8}" + "".join(f"{k:>14}" for k in keys))
    for name, t in rows.items():
        print(f"{name:<8}" + "".join(f"{t[k]:14.2f}" for k in keys))
    later = lambda mode, k: statistics.fmean(t[k] for n, t in rows.items() if n.startswith(mode) and n != f"{mode} 1")  # noqa: E731
    if a.runs > 1:
        print(f"after the first run: actors up in {later('cold', 'actors_up') - later('cold', 'ray_and_data'):.1f} s cold, "
              f"{later('warm', 'actors_up') - later('warm', 'ray_and_data'):.1f} s warm; whole run "
              f"{later('cold', 'done'):.1f} s cold, {later('warm', 'done'):.1f} s warm "
              f"({later('cold', 'done') / later('warm', 'done'):.2f}x)")
    print("every run computed the same step records and evaluation")
    if a.out:
        Path(a.out).write_text(json.dumps({"runs": a.runs, "steps": a.steps, "timing": rows}, indent=2))


if __name__ == "__main__":
    main()
