"""Branches on nodes of their own: a Ray cluster of three nodes on this machine (Ray's own
`ray.cluster_utils.Cluster`: a head that holds no actor, two worker nodes offering one
`copd_branch_node` each, every node its own raylet and object store), a two-branch run with
ray.branch_nodes=own joined to it from the CLI, teacher scoring and weight sync crossing
nodes; its step records equal those of the same run on one node."""

import json
import os
import subprocess
import sys

import pytest

from conftest import FAST
from copd_ray.config import load_config
from copd_ray.driver import train

CLUSTER = """
import sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
for _ in range(2):
    cluster.add_node(num_cpus=2, resources={"copd_branch_node": 1})
cluster.wait_for_nodes()
print(cluster.address, flush=True)
sys.stdin.read()  # until the test closes it
cluster.shutdown()
"""


def _steps(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return sorted(({k: v for k, v in r.items() if not k.startswith("time/")} for r in rows if r["kind"] == "step"),
                  key=lambda r: (r["step"], r["branch"]))


@pytest.mark.slow  # three nodes up, a run on them: about a minute on 2 cores
def test_each_branch_on_a_node_of_its_own_computes_what_one_node_computes(warm_pool, tiny_folder, tmp_path):
    run = FAST + [f"model.path={tiny_folder}", "schedule.cycles=1", "schedule.rl_steps=1", "schedule.opd_steps=2",
                  "eval.every=0", "metrics.pair_every=0"]
    one = tmp_path / "one-node"
    train(load_config(None, run + [f"output_dir={one}"]), pool=warm_pool)

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cluster = subprocess.Popen([sys.executable, "-c", CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, env=env)
    try:
        address = cluster.stdout.readline().strip()
        assert address, "the cluster did not come up"
        spread = tmp_path / "three-nodes"
        done = subprocess.run([sys.executable, "-m", "copd_ray.cli", "train", *run, f"output_dir={spread}",
                               f"ray.address={address}", "ray.branch_nodes=own"],
                              capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    finally:
        cluster.stdin.close()
        cluster.wait(timeout=120)

    nodes = json.loads((spread / "actor_nodes.json").read_text())
    add, mul = (set(nodes[b].values()) for b in ("add", "mul"))
    assert len(add) == len(mul) == 1 and add != mul, nodes  # every actor of a branch on its own node
    assert set(nodes["add"]) == {"trainer 0", "generator 0", "scorer"}
    assert f"add on {next(iter(add))[:8]}" in done.stdout and f"mul on {next(iter(mul))[:8]}" in done.stdout
    assert _steps(spread) == _steps(one) and len(_steps(one)) == 6
