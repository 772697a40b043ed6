"""Self-healing runs: kill -9 (by pid) a generator, a scorer and a trainer of a running
two-branch run in Phase II; the run finishes by itself with exact accounting."""

import json
import os
import signal
import threading
import time

import ray
import torch
from conftest import SMALL_ACTORS, SMALL_STEPS
from transformers import AutoModelForCausalLM

from copd_ray.batch import TrainBatch
from copd_ray.config import load_config
from copd_ray.driver import train
from copd_ray.errors import ActorFailure

SAVE_EVERY = 2
RUN = ["wandb.mode=disabled", *SMALL_ACTORS, *SMALL_STEPS, "capabilities.0.heldout_size=20", "capabilities.1.heldout_size=20",
       "eval.every=0", "metrics.pair_every=0", "schedule.cycles=1", "schedule.rl_steps=1",
       f"schedule.save_every={SAVE_EVERY}",
       # A member killed mid-broadcast holds the others in it this long before the group is
       # rebuilt (120 s by default); the tiny policy's buckets take milliseconds.
       "ray.collective_timeout_s=15"]


def _records(out, kind=None):
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r["kind"] == kind]


def _recoveries(out):
    return [r for r in _records(out, "event") if r["event"] == "actor_recovered"]


class Run(threading.Thread):
    """train() in a background thread, so that the test can kill its actors."""

    def __init__(self, cfg, pool=None):
        super().__init__(daemon=True)
        self.cfg, self.pool, self.summary, self.error = cfg, pool, None, None

    def run(self):
        try:
            self.summary = train(self.cfg, pool=self.pool)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e


def _wait(run, condition, what, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        assert run.is_alive(), f"the run ended while waiting for {what}: {run.error!r}"
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _kill(out, branch, role):
    pid = json.loads((out / "actors.json").read_text())[branch][role]
    os.kill(pid, signal.SIGKILL)
    return pid


def _killed_and_clean(common, victims, tmp_path, pool=None):
    """The same run without failures, then with `victims` killed one by one in Phase II
    (each recovered before the next): their output folders. With a `pool`, the killed run's
    actors are the clean run's, reloaded: a restarted one comes back as its first run's."""
    clean = tmp_path / "clean"
    train(load_config(None, common + [f"output_dir={clean}"]), pool=pool)
    killed = tmp_path / "killed"
    run = Run(load_config(None, common + [f"output_dir={killed}"]), pool)
    run.start()
    pids = []
    for i, (branch, role) in enumerate(victims):
        _wait(run, lambda: any(r["phase"] == "opd" for r in _records(killed, "step")), "Phase II")
        pids.append(_kill(killed, branch, role))
        _wait(run, lambda: len(_recoveries(killed)) == i + 1, f"the recovery of {role} of {branch}")
    run.join(timeout=600)
    assert not run.is_alive() and run.error is None, run.error
    assert [e["pid_before"] for e in _recoveries(killed)] == pids
    return killed, clean


def _step_numbers(out):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in _records(out, "step")]


def test_a_killed_generator_scorer_and_trainer_are_recovered_and_log_what_a_clean_run_logs(warm_pool, tiny_folder,
                                                                                            tmp_path):
    """A retried step and a replay from a checkpoint compute the same numbers: the step
    records, the budget and the evaluation equal those of the same run without failures."""
    opd_steps = 16  # enough steps left after each recovery for the next kill
    victims = [("add", "generator 0"), ("mul", "scorer"), ("add", "trainer 0")]
    out, clean = _killed_and_clean(RUN + [f"schedule.opd_steps={opd_steps}", "ray.max_failures=3",
                                          f"model.path={tiny_folder}"], victims, tmp_path, warm_pool)

    events = _recoveries(out)
    assert [(e["branch"], e["actor"]) for e in events] == victims
    assert all(e["pid_after"] != e["pid_before"] for e in events)
    generator, scorer, trainer = events
    assert generator["then"] == scorer["then"] == "retry the step"
    # A lost trainer costs at most the steps since the last checkpoint, replayed from it.
    assert trainer["then"] == "rollback to the last checkpoint"
    assert trainer["rolled_back_to"] % SAVE_EVERY == 0 and 1 <= trainer["steps_redone"] <= SAVE_EVERY
    assert trainer["step"] - trainer["steps_redone"] == trainer["rolled_back_to"]

    # Exact accounting: one record per branch and step, in order, versions without gaps.
    total = 1 + opd_steps
    steps = _records(out, "step")
    for branch in ("add", "mul"):
        mine = [r for r in steps if r["branch"] == branch]
        assert [r["step"] for r in mine] == list(range(1, total + 1))
        assert [r["version"] for r in mine] == list(range(1, total + 1))
    assert _step_numbers(out) == _step_numbers(clean)
    summary, clean_summary = (json.loads((o / "eval.json").read_text()) for o in (out, clean))
    assert summary["budget"]["opd_steps"] == 2 * opd_steps and summary["budget"]["rl_steps"] == 2
    assert summary["budget"] == clean_summary["budget"] and summary["eval"] == clean_summary["eval"]
    for folder in (out / "merged", out / "branches" / "add", out / "branches" / "mul"):
        AutoModelForCausalLM.from_pretrained(folder)
    # The pid file names the processes that run now.
    now = json.loads((out / "actors.json").read_text())
    assert now["add"]["generator 0"] == generator["pid_after"] and now["mul"]["scorer"] == scorer["pid_after"]


def test_a_killed_topology_actor_is_restarted_given_the_graph_and_endpoints_and_the_run_logs_what_a_clean_run_logs(
        warm_pool, tiny_folder, tmp_path):
    """Ray restarts the TopologyActor (its __init__ holds the graph it was first made with and no
    endpoint); the healer tells it by its incarnation, gives it the run's graph and every
    scorer endpoint, and the step that asked it for teachers is retried before any prompt of
    it is drawn: the step records equal the clean run's."""
    out, clean = _killed_and_clean(RUN + ["schedule.opd_steps=6", f"model.path={tiny_folder}"],
                                   [("*", "topology")], tmp_path, warm_pool)
    (event,) = _recoveries(out)
    assert (event["branch"], event["actor"], event["then"]) == ("*", "topology", "retry the step")
    assert event["pid_after"] != event["pid_before"]
    assert _step_numbers(out) == _step_numbers(clean)
    assert json.loads((out / "actors.json").read_text())["*"]["topology"] == event["pid_after"]


def test_more_failures_than_allowed_stop_the_run_with_one_line(ray_session, tiny_folder, tmp_path):
    out = tmp_path / "run"
    run = Run(load_config(None, RUN + ["schedule.opd_steps=40", "ray.max_failures=1", f"model.path={tiny_folder}",
                                       f"output_dir={out}"]))
    run.start()
    _wait(run, lambda: any(r["phase"] == "opd" for r in _records(out, "step")), "Phase II")
    _kill(out, "add", "generator 0")
    _wait(run, lambda: len(_recoveries(out)) == 1, "the first recovery")
    pid = _kill(out, "add", "generator 0")
    run.join(timeout=300)
    assert not run.is_alive()
    assert isinstance(run.error, ActorFailure), run.error
    message = str(run.error)
    assert "\n" not in message
    assert f"generator 0 of branch 'add' (pid {pid})" in message and "ray.max_failures=1" in message


def test_a_sharded_branch_recovers_a_lost_generator_and_a_lost_rank_exactly(warm_pool, tiny_folder, tmp_path):
    """Two FSDP2 trainer ranks: a lost generator leaves the ranks' group and shards as they
    are; a lost rank rebuilds the group on every rank and replays from the checkpoint. The
    records equal those of the same run without failures."""
    common = RUN + ["schedule.opd_steps=6", "resources.num_trainers=2", f"model.path={tiny_folder}"]
    killed, clean = _killed_and_clean(common, [("add", "generator 0"), ("add", "trainer 1")], tmp_path, warm_pool)
    assert [e["then"] for e in _recoveries(killed)] == ["retry the step", "rollback to the last checkpoint"]
    assert _step_numbers(killed) == _step_numbers(clean)


def test_a_scorer_restarted_after_its_trainer_stepped_takes_the_last_synced_weights(ray_session, tiny_folder,
                                                                                   tiny_tokenizer, tmp_path):
    """Its students still to score this step expect the teacher they would have met: the
    last synced version, which the generators hold; the trainer's stepped weights would
    have scored the retried step one version ahead (records then differ from a clean run's)."""
    from conftest import started_branch, train_on
    from rich.console import Console

    from copd_ray.recovery import SelfHealing
    from copd_ray.topology import Topology
    from copd_ray.topology.actor import TopologyActor

    cfg = load_config(None, SMALL_ACTORS + ["ray.max_failures=2"])
    prompt = tiny_tokenizer("12+34=")["input_ids"]
    rows = [prompt + tiny_tokenizer(a, add_special_tokens=False)["input_ids"] for a in ("46", "47", "45", "4")]
    batch = TrainBatch.of(4, rows, [len(prompt)] * 4, [1.0, 0.0, 0.0, 1.0])
    with started_branch("mul", cfg, tiny_folder, "test-scorer-heal") as group:
        topology = Topology.from_config("none", ["mul"])
        topology_actor = TopologyActor.remote(topology)
        events = []
        healer = SelfHealing({"mul": group}, topology_actor, topology, {"mul": group.scorer}, 2, 60, events.append,
                             Console(quiet=True), tmp_path / "actors.json")
        train_on(group, batch)  # the trainer steps; the step's sync has not come yet
        synced, trained = ray.get(group.generators[0].state_dict.remote()), group.trainer_state()
        before = ray.get(group.scorer.ready.remote())["incarnation"]
        ray.kill(group.scorer, no_restart=False)
        deadline = time.time() + 120
        while time.time() < deadline:  # as in a run, the failure is seen once the process is gone
            try:
                if ray.get(group.scorer.ready.remote(), timeout=30)["incarnation"] != before:
                    break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
                time.sleep(0.2)
        healer.recover(RuntimeError("the scorer died"))
        held = ray.get(group.scorer.state_dict.remote())
        assert all(torch.equal(held[k], synced[k]) for k in synced)
        assert any(not torch.equal(held[k], trained[k].to(held[k].dtype)) for k in held)
        assert ray.get(group.scorer.version.remote()) == group.version == 0
        assert [(e["actor"], e["then"]) for e in events] == [("scorer", "retry the step")]
        ray.kill(topology_actor)
