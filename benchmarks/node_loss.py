"""The node-loss drill: a whole Ray node lost in Phase II, on a cluster of several nodes on
this machine (Ray's own `ray.cluster_utils.Cluster`: a head holding no actor, worker nodes
offering one `copd_branch_node` each, every node its own raylet and object store).

    python benchmarks/node_loss.py [--opd-steps 8] [--out node_loss.json]

Three runs of the same two-branch config (ray.branch_nodes=own, a checkpoint every 2 steps),
each a `copd-ray train` process joined to its cluster:
  1. uninterrupted, on two worker nodes: the reference;
  2. a spare third node, and the node holding branch `add` killed (its raylet and everything
     it started) after two Phase II steps: `add`'s actors come back on the spare node, every
     branch replays from the last checkpoint, the run finishes by itself;
  3. no spare node: after ray.restart_timeout_s the run stops with one line naming the actor,
     its node and the step; a node is added and the same command resumes the run.
Printed: seconds from the kill to the recovery line, the recovery's own seconds, steps
redone, whether the step records and the final evaluation equal the reference's, and the
no-room stop's line and seconds. Every figure is checked before it is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CLUSTER = """
import sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
for _ in range(int(sys.argv[1])):
    cluster.add_node(num_cpus=2, resources={"copd_branch_node": 1})
cluster.wait_for_nodes()
print(cluster.address, flush=True)
for line in sys.stdin:  # "kill <node id>" or "add"
    word, _, node_id = line.strip().partition(" ")
    if word == "add":
        cluster.add_node(num_cpus=2, resources={"copd_branch_node": 1})
        cluster.wait_for_nodes()
    for node in list(cluster.worker_nodes) if word == "kill" else []:
        if node.node_id == node_id:
            cluster.remove_node(node, allow_graceful=False)
    print("done", flush=True)
cluster.shutdown()
"""


class LocalCluster:
    def __init__(self, workers: int, env: dict) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CLUSTER, str(workers)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.address = self.proc.stdout.readline().strip()
        if not self.address:
            raise RuntimeError("the cluster did not come up")

    def tell(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "done"

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


class Run:
    """`copd-ray train` on a cluster, its output lines timed as they arrive."""

    def __init__(self, overrides: list[str], env: dict) -> None:
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "copd_ray.cli", "train", *overrides], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip()))

    def wait(self, timeout: float = 900) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code

    def first(self, text: str) -> tuple[float, str]:
        return next((t, line) for t, line in self.lines if text in line)


def _opd_steps_done(out: Path) -> int:
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return len([r for r in rows if r["kind"] == "step" and r["phase"] == "opd"])


def _steps(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return sorted(({k: v for k, v in r.items() if not k.startswith("time/")} for r in rows if r["kind"] == "step"),
                  key=lambda r: (r["step"], r["branch"]))


def _events(out: Path, name: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "event" and r["event"] == name]


def _kill_add_when_in_phase_2(cluster: LocalCluster, run: Run, out: Path) -> float:
    while _opd_steps_done(out) < 4:  # two Phase II steps of each branch
        if run.proc.poll() is not None:
            raise RuntimeError("the run ended before Phase II:\n" + "\n".join(line for _, line in run.lines[-30:]))
        time.sleep(0.1)
    node = json.loads((out / "actor_nodes.json").read_text())["add"]["trainer 0"]
    killed = time.monotonic()
    cluster.tell(f"kill {node}")
    return killed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--opd-steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    runs = Path(tempfile.mkdtemp(prefix="node_loss_"))  # the three runs' output folders
    common = ["wandb.mode=disabled", "resources.trainer_cpus=0.5", "resources.generator_cpus=0.25",
              "resources.scorer_cpus=0.25", "schedule.cycles=1", "schedule.rl_steps=1",
              f"schedule.opd_steps={args.opd_steps}", "schedule.save_every=2", "eval.every=0", "metrics.pair_every=0",
              "ray.branch_nodes=own", "ray.collective_timeout_s=15"]
    figures: dict = {}

    cluster = LocalCluster(2, env)
    reference = runs / "reference"
    try:
        if Run(common + [f"output_dir={reference}", f"ray.address={cluster.address}"], env).wait() != 0:
            raise RuntimeError("the reference run failed")
    finally:
        cluster.close()

    cluster = LocalCluster(3, env)  # a spare node
    spare = runs / "spare"
    try:
        run = Run(common + [f"output_dir={spare}", f"ray.address={cluster.address}"], env)
        killed = _kill_add_when_in_phase_2(cluster, run, spare)
        if run.wait() != 0:
            raise RuntimeError("the run with a spare node did not finish:\n" + "\n".join(x for _, x in run.lines[-30:]))
    finally:
        cluster.close()
    noticed, _ = run.first("recovered ")
    (event, *_) = _events(spare, "actor_recovered")
    figures["spare node"] = {"recovery_line_after_kill_s": round(noticed - killed, 1),
                             "recovery_s": event["seconds"], "steps_redone": event["steps_redone"],
                             "actors_back": sorted(e["actor"] for e in _events(spare, "actor_recovered")),
                             "records_equal": _steps(spare) == _steps(reference),
                             "eval_equal": json.loads((spare / "eval.json").read_text())["eval"]
                             == json.loads((reference / "eval.json").read_text())["eval"]}

    cluster = LocalCluster(2, env)  # no spare node
    stuck = runs / "no_room"
    overrides = common + [f"output_dir={stuck}", f"ray.address={cluster.address}", "ray.restart_timeout_s=20"]
    try:
        run = Run(overrides, env)
        killed = _kill_add_when_in_phase_2(cluster, run, stuck)
        code = run.wait()
        stopped = time.monotonic()
        errors = [line for _, line in run.lines if line.startswith("error:")]
        cluster.tell("add")  # a node again: the same command resumes
        resumed = Run(overrides, env)
        resumed_code = resumed.wait()
    finally:
        cluster.close()
    resumed_from = _events(stuck, "resumed")
    figures["no room"] = {"exit_code": code, "stopped_after_kill_s": round(stopped - killed, 1),
                          "line": errors[-1] if errors else None, "resumed_exit_code": resumed_code,
                          "resumed_from_step": resumed_from[-1]["step"] if resumed_from else None,
                          "records_equal_after_resume": _steps(stuck) == _steps(reference)}

    problems = [k for k, ok in [("spare: records", figures["spare node"]["records_equal"]),
                                ("spare: eval", figures["spare node"]["eval_equal"]),
                                ("no room: exit 1", code == 1), ("no room: one line", bool(errors)),
                                ("no room: resumed", resumed_code == 0),
                                ("no room: records", figures["no room"]["records_equal_after_resume"])] if not ok]
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    if problems:
        raise SystemExit(f"checks failed: {problems}")
    print("every check passed")


if __name__ == "__main__":
    main()
