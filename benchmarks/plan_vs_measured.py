"""`copd-ray plan`'s estimate of each actor's peak memory beside the peak resident memory
that actor reached in a real run of the same config, side by side.

    python benchmarks/plan_vs_measured.py [CONFIG.yaml] [key=value ...] [--out DIR]

The default is configs/smollm2.yaml (the real SmolLM2-135M-Instruct) on a short schedule:
one cycle of 3 GRPO and 3 OPD steps, with the config's own batch and lengths. A sampler thread
reads every actor's resident set size (psutil, every 0.2 s; actors.json names each actor's
process) while `train` runs. The table gives for each actor:
- the plan's estimate;
- its peak during training (to the branches' save);
- the ratio of the two;
- its peak over the whole run, final evaluation included, which the plan does not model.

A ratio outside [0.75, 1.25] is flagged. The rows must name the same actors, or it stops.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
from collections import defaultdict
from pathlib import Path

SHORT = ["schedule.cycles=1", "schedule.rl_steps=3", "schedule.opd_steps=3", "eval.every=3", "wandb.mode=disabled",
         "resume=never"]
GiB = 2**30


class Sampler(threading.Thread):
    """Peak RSS of every actor named in <out>/actors.json, before and after `split()`."""

    def __init__(self, out: Path, every_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.out, self.every_s, self.stop = out, every_s, threading.Event()
        self.training: dict[str, int] = defaultdict(int)
        self.whole: dict[str, int] = defaultdict(int)
        self.in_training = True

    def run(self) -> None:
        import psutil

        while not self.stop.wait(self.every_s):
            # Training ends where the branches are saved for the merge and the final evaluation.
            if self.in_training and any((self.out / "branches").glob("*/config.json")):
                self.in_training = False
            try:
                actors = json.loads((self.out / "actors.json").read_text())
            except (OSError, ValueError):
                continue
            for branch, pids in actors.items():
                for actor, pid in pids.items():
                    try:
                        rss = psutil.Process(pid).memory_info().rss
                    except psutil.Error:
                        continue
                    key = f"{branch} {actor}"
                    self.whole[key] = max(self.whole[key], rss)
                    if self.in_training:
                        self.training[key] = max(self.training[key], rss)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] [key=value ...]")
    p.add_argument("--out", default=None, help="the run's output folder (default: a temporary one)")
    a = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from rich.console import Console
    from rich.table import Table

    from copd_ray.config import load_config
    from copd_ray.driver import train
    from copd_ray.bootstrap import ensure_base_policy
    from copd_ray.plan import plan_memory

    args = list(a.args)
    config = args.pop(0) if args and "=" not in args[0] else "configs/smollm2.yaml"
    out = Path(a.out or tempfile.mkdtemp(prefix="plan-vs-measured-"))
    cfg = load_config(config, SHORT + args + [f"output_dir={out}"])
    ensure_base_policy(cfg)  # the plan reads the model's folder and tokenizer
    plan = plan_memory(cfg)
    estimates = {f"{r.branch} {r.actor}": r.need for r in plan.rows}

    sampler = Sampler(out)
    sampler.start()
    train(cfg, console=Console(quiet=True))
    sampler.stop.set()
    sampler.join()
    if set(sampler.whole) != set(estimates):
        raise SystemExit(f"the run's actors {sorted(sampler.whole)} are not the plan's {sorted(estimates)}")

    table = Table(title=f"plan vs measured peak RSS, GiB ({config}; {cfg.model.gguf or cfg.model.path or 'tiny'})")
    for col in ("actor", "plan", "training", "plan / training", "whole run", ""):
        table.add_column(col, justify="left" if col in ("actor", "") else "right")
    rows = []
    for key, need in estimates.items():
        got, whole = sampler.training[key], sampler.whole[key]
        ratio = need / got
        flag = "" if 0.75 <= ratio <= 1.25 else "off by more than 25%"
        rows.append({"actor": key, "plan_bytes": need, "training_bytes": got, "whole_run_bytes": whole,
                     "ratio": round(ratio, 3)})
        table.add_row(key, f"{need / GiB:.2f}", f"{got / GiB:.2f}", f"{ratio:.2f}", f"{whole / GiB:.2f}", flag)
    Console().print(table)
    (out / "plan_vs_measured.json").write_text(json.dumps({"config": config, "overrides": SHORT + args,
                                                            "rows": rows, "notes": plan.notes}, indent=2))
    print(f"wrote {out / 'plan_vs_measured.json'}")


if __name__ == "__main__":
    main()
