"""Kill drill: `kill -9` a generator, a scorer and a trainer of a running `copd-ray train`
in Phase II, one after another, and print what each recovery cost.

    python benchmarks/kill_drill.py [CONFIG.yaml] [key=value ...]

Runs the config (default: configs/demo.yaml for 1 cycle of 10 RL + 30 OPD steps) in a
subprocess with its own local Ray, kills each actor (by the pid in `actors.json`) once the
previous recovery is logged, waits for the run to finish, and prints a table from its
`metrics.jsonl`: the actor, how long the recovery took, what happened next and how many
steps were redone; then the run's held-out table as the CLI printed it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VICTIMS = [("add", "generator 0"), ("mul", "scorer"), ("add", "trainer 0")]


def records(out: Path, kind: str) -> list[dict]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, filter(None, lines)) if r["kind"] == kind]


def main() -> None:
    args = sys.argv[1:] or ["configs/demo.yaml", "schedule.cycles=1", "schedule.rl_steps=10", "schedule.opd_steps=30",
                            "eval.every=0"]
    out = Path(tempfile.mkdtemp(prefix="kill-drill-"))
    cmd = [sys.executable, "-m", "copd_ray.cli", "train", *args, f"output_dir={out}", "wandb.mode=disabled"]
    started = time.perf_counter()
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})

    def wait_for(condition, what: str) -> None:
        while not condition():
            if run.poll() is not None:
                sys.exit(f"the run ended before {what}:\n{run.stdout.read()}")
            time.sleep(0.2)

    for i, (branch, role) in enumerate(VICTIMS):
        wait_for(lambda: any(r["phase"] == "opd" for r in records(out, "step")), "Phase II")
        pid = json.loads((out / "actors.json").read_text())[branch][role]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: len([e for e in records(out, "event") if e["event"] == "actor_recovered"]) > i,
                 f"the recovery of {role} of {branch}")
    output, _ = run.communicate()
    if run.returncode:
        sys.exit(f"the run failed:\n{output}")

    print(f"{' '.join(args)}: finished in {time.perf_counter() - started:.0f} s with {len(VICTIMS)} actors killed")
    print(f"{'killed':<24} {'at step':>7} {'recovery s':>10}  then{'':<32} {'steps redone':>12}")
    for e in (e for e in records(out, "event") if e["event"] == "actor_recovered"):
        print(f"{e['actor'] + ' of ' + e['branch']:<24} {e['step']:>7} {e['seconds']:>10.1f}  {e['then']:<36} "
              f"{e.get('steps_redone', 0):>12}")
    steps = records(out, "step")
    once = len(steps) == len({(r["branch"], r["step"]) for r in steps})
    print(f"step records: {len(steps)}, each (branch, step) {'once' if once else 'MORE THAN ONCE'}")
    print(output[output.rfind("held-out pass@1"):])


if __name__ == "__main__":
    main()
