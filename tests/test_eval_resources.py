"""Evaluation tasks ask Ray for what a generator has, so that on a GPU cluster they run on a GPU."""

import time

import ray

from copd_ray.capabilities import build_capability
from copd_ray.config import load_config
from copd_ray.runtime import eval_device, eval_task_options, evaluate_folder


def test_an_evaluation_task_asks_for_a_generators_cpus_and_gpus():
    cpu = load_config(None, ["resources.generator_cpus=0.25"])
    assert eval_task_options(cpu) == {"num_cpus": 0.25, "num_gpus": 0.0}
    assert eval_device(cpu) == "cpu"
    gpu = load_config(None, ["resources.generator_cpus=2", "resources.generator_gpus=0.5"])
    assert eval_task_options(gpu) == {"num_cpus": 2.0, "num_gpus": 0.5}
    # With a GPU asked for, the engine goes on "cuda" where torch sees one (none here).
    import torch

    assert eval_device(gpu) == ("cuda" if torch.cuda.is_available() else "cpu")


PROBE = """
import json, os, sys
import ray
from copd_ray.config import load_config
from copd_ray.runtime import eval_task_options

ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)  # a GPU node, as Ray sees it

@ray.remote
def visible():
    return ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")

out = {g: ray.get(visible.options(**eval_task_options(load_config(None, [f"resources.generator_gpus={g}"]))).remote())
       for g in ("0", "0.5")}
print(json.dumps(out))
"""


def test_on_a_gpu_node_a_task_gets_the_gpu_only_when_it_asks():
    """Why the options matter: only a task that asks for a GPU gets one assigned and named in
    CUDA_VISIBLE_DEVICES (its own Ray, told the node has one GPU; nothing touches CUDA)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    for name in ("RAY_ADDRESS", "CUDA_VISIBLE_DEVICES"):
        env.pop(name, None)
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["0"][0] == []  # nothing reserved (Ray 2.60 leaves CUDA_VISIBLE_DEVICES as it was)
    assert [str(i) for i in seen["0.5"][0]] == ["0"] and seen["0.5"][1] == "0"


def test_the_cpu_evaluation_task_runs_with_these_options(ray_session, tiny_folder):
    cfg = load_config(None, [f"model.path={tiny_folder}", "resources.generator_cpus=0.1"])
    held = {c.name: build_capability(c, cfg.seed).heldout[:6] for c in cfg.capabilities}
    rates = ray.get(evaluate_folder.options(**eval_task_options(cfg)).remote(str(tiny_folder), cfg, held))
    assert set(rates) == {"add", "mul"} and all(0.0 <= r <= 1.0 for r in rates.values())


def _dies_within(actor, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=seconds)
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.5)
    return False


def test_a_runs_final_evaluation_on_its_warm_generators_equals_the_evaluation_tasks(ray_session, tiny_folder,
                                                                                    tiny_tokenizer, tmp_path):
    """Runtime.evaluate: each generator loads a saved folder's weights over its own and
    evaluates it; the numbers are those of a fresh evaluation task on that folder, whichever
    folder the generator held before (partial-credit rewards, so the rates are not all 0)."""
    from rich.console import Console

    from copd_ray.models import build_tiny_policy, save_policy
    from copd_ray.runtime import Runtime
    from copd_ray.topology import Topology

    other = save_policy(build_tiny_policy(tiny_tokenizer, seed=1), tiny_tokenizer, tmp_path / "other")
    cfg = load_config(None, [f"model.path={tiny_folder}", "capabilities.0.reward=char_overlap",
                             "capabilities.1.reward=char_overlap", "resources.trainer_cpus=0.1",
                             "resources.generator_cpus=0.1", "resources.scorer_cpus=0.1"])
    held = {c.name: build_capability(c, cfg.seed).heldout[:12] for c in cfg.capabilities}
    # Two branches, two generators: a and c go to one (tiny, then other), b and d to the other.
    folders = {"a": str(tiny_folder), "b": str(other), "c": str(other), "d": str(tiny_folder)}
    runtime = Runtime(cfg, Topology.from_config("pairwise", ["add", "mul"]), str(tiny_folder), Console(quiet=True))
    actors = [runtime.topology_actor] + [a for g in runtime.groups.values() for a in g.members().values()]
    try:
        warm = runtime.evaluate(folders, cfg, held)
    finally:
        runtime.close()
    # Every actor ends, the topology actor too (every run in a Ray session used to leave one
    # behind). ray.kill is asynchronous: on busy cores a call can still be answered first.
    assert all(_dies_within(actor, 60.0) for actor in actors)
    task = evaluate_folder.options(**eval_task_options(cfg))
    fresh = dict(zip(folders, ray.get([task.remote(f, cfg, held) for f in folders.values()])))
    assert warm == fresh
    assert warm["a"] == warm["d"] and warm["b"] == warm["c"] and warm["a"] != warm["b"]
    assert any(r > 0.0 for rates in warm.values() for r in rates.values())
