"""WarmPool: runs in one Ray session reuse the last run's actor processes (reloaded with the
new run's model and settings) and compute exactly what fresh actors compute."""

import json
import os
import signal
import time

import ray
from conftest import SMALL_ACTORS, SMALL_STEPS

from copd_ray.config import load_config
from copd_ray.driver import train
from copd_ray.runtime import WarmPool

RUN = ["wandb.mode=disabled", *SMALL_ACTORS, *SMALL_STEPS, "capabilities.0.heldout_size=40", "capabilities.1.heldout_size=40",
       "capabilities.0.reward=char_overlap", "capabilities.1.reward=char_overlap", "grpo.lr=0.005",
       "metrics.pair_sequences=8", "schedule.cycles=1", "schedule.rl_steps=2", "schedule.opd_steps=2",
       "eval.every=0", "metrics.pair_every=2", "schedule.save_every=0"]


def _steps(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "driver/"))}
            for r in rows if r["kind"] in ("step", "pair")]


def test_a_run_on_warm_actors_computes_what_a_cold_run_computes(ray_session, tiny_folder, tmp_path):
    pool = WarmPool()
    runs = {}
    try:
        for name in ("cold", "warm"):
            out = tmp_path / name
            summary = train(load_config(None, RUN + [f"model.path={tiny_folder}", f"output_dir={out}"]), pool=pool)
            runs[name] = (summary, json.loads((out / "actors.json").read_text()), _steps(out))
        assert len(pool.idle) == 2  # both branches wait for a third run
        _a_restarted_member_is_reloaded_with_its_runs_arguments(pool, tiny_folder)
    finally:
        pool.close()
    (cold, cold_pids, cold_steps), (warm, warm_pids, warm_steps) = runs["cold"], runs["warm"]
    assert warm_pids == cold_pids  # the same processes, reloaded
    assert len(cold_steps) == 8 + 6 and any(r.get("loss") for r in cold_steps)  # 4 steps x 2 branches; pairs at 0, 2, 4
    assert warm_steps == cold_steps  # every step's and pair's numbers
    assert warm["eval"] == cold["eval"]
    assert warm["timing"]["actors_up"] < cold["timing"]["actors_up"]


def _a_restarted_member_is_reloaded_with_its_runs_arguments(pool, tiny_folder):
    """Ray restarts a dead actor with the arguments it was created with: in a reused group,
    another run's. BranchGroup.reload (which recovery calls) makes it this run's again."""
    shape, group = pool.idle[0]
    created_as = group.name
    other = "mul" if created_as == "add" else "add"
    group.reuse(other, load_config(None, RUN + [f"model.path={tiny_folder}", "seed=7"]), str(tiny_folder), "r")
    assert {a["branch"] for a in ray.get(group.start_actors())} == {other}
    generator = group.generators[0]
    os.kill(ray.get(generator.ready.remote())["pid"], signal.SIGKILL)
    deadline = time.time() + 120
    while True:  # calls fail until Ray has restarted it
        try:
            answer = ray.get(generator.ready.remote(), timeout=10)
            break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            assert time.time() < deadline, "the generator was not restarted"
            time.sleep(0.2)
    assert answer["branch"] == created_as  # __init__ ran with the first run's arguments
    (reloaded,) = ray.get(group.reload(["generator 0"]))
    assert reloaded["branch"] == other and reloaded["pid"] == answer["pid"]
    group.shutdown()
    pool.idle.remove((shape, group))
