"""Algorithm 1 end to end on a real local Ray, with the untrained tiny policy."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import FAST, sigint_reaches_child
from copd_ray.config import load_config
from copd_ray.driver import train
from copd_ray.run_data import BranchDataError
from copd_ray.errors import CheckpointError
from copd_ray.topology import Topology



def _records(out, kind):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if json.loads(line)["kind"] == kind]


def test_one_cycle_completes_and_merges_to_the_mean(warm_pool, tiny_folder, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, FAST + [f"model.path={tiny_folder}", f"output_dir={out}", "schedule.cycles=1",
                                    "schedule.rl_steps=2", "schedule.opd_steps=1", "eval.every=3", "metrics.pair_every=1"])
    summary = train(cfg, pool=warm_pool)

    evals = json.loads((out / "eval.json").read_text())["eval"]
    assert set(evals) == {"base", "branch:add", "branch:mul", "merged"}
    assert all(set(per) == {"add", "mul"} for per in evals.values())

    add, mul = (load_file(str(out / "branches" / n / "model.safetensors")) for n in ("add", "mul"))
    merged = load_file(str(out / "merged" / "model.safetensors"))
    assert merged.keys() == add.keys()
    assert all(torch.allclose(merged[k], (add[k] + mul[k]) / 2, atol=1e-7) for k in merged)
    assert any(not torch.equal(add[k], mul[k]) for k in add)  # the branches really diverged
    AutoModelForCausalLM.from_pretrained(out / "merged")
    AutoModelForCausalLM.from_pretrained(out / "branches" / "add")

    steps = _records(out, "step")
    assert [(r["step"], r["phase"]) for r in steps if r["branch"] == "add"] == [(1, "rl"), (2, "rl"), (3, "opd")]
    keys = {"reward_mean", "pass_rate", "response_length", "loss", "clip_fraction", "entropy", "grad_norm",
            "version", "time/generate", "time/score", "time/train", "time/sync"}
    assert all(keys <= r.keys() for r in steps)
    assert [r["version"] for r in steps if r["branch"] == "mul"] == [1, 2, 3]
    opd = [r for r in steps if r["phase"] == "opd"]
    assert {r["branch"]: r["opd/" + ("mul" if r["branch"] == "add" else "add") + "/teacher_version"] for r in opd} == {"add": 2, "mul": 2}
    pairs = _records(out, "pair")
    assert {(p["teacher"], p["student"]) for p in pairs} == {("add", "mul"), ("mul", "add")}
    assert all(0 <= p["topk_overlap"] <= 1 and p["symmetric_kl"] >= 0 for p in pairs)
    assert {(e["step"], e["branch"], e["capability"]) for e in _records(out, "eval")} >= {(3, "add", "mul"), (0, "mul", "add")}
    assert {p.rsplit("/", 1)[-1] for p in summary["plots"]} == {"accuracy.png", "training.png", "pair_metrics.png"}


def test_merge_every_cycle_continues_every_branch_from_the_merge(warm_pool, tiny_folder, tmp_path):
    out = tmp_path / "every"
    # A shaped reward gives the untrained policy a gradient, so the branches differ by cycle 1's end.
    cfg = load_config(None, FAST + [f"model.path={tiny_folder}", f"output_dir={out}", "schedule.cycles=2",
                                    "schedule.rl_steps=1", "schedule.opd_steps=1", "eval.every=0",
                                    "metrics.pair_every=0", "merge.every_cycle=true", "grpo.lr=0.005",
                                    "capabilities.0.reward=char_overlap", "capabilities.1.reward=char_overlap"])
    train(cfg, pool=warm_pool)
    cycle = out / "cycle_merges" / "cycle_1"
    add, mul = (load_file(str(cycle / n / "model.safetensors")) for n in ("add", "mul"))
    merged = load_file(str(cycle / "merged" / "model.safetensors"))
    assert any(not torch.equal(add[k], mul[k]) for k in add)  # cycle 1 left them apart ...
    assert all(torch.allclose(merged[k], (add[k] + mul[k]) / 2, atol=1e-7) for k in merged)
    # ... and both continued from the merge: step 2's checkpoint holds it in each branch.
    for n in ("add", "mul"):
        saved = load_file(str(out / "checkpoints" / "step_000002" / "branches" / n / "model.safetensors"))
        assert all(torch.equal(saved[k], merged[k]) for k in merged)
    assert not (out / "cycle_merges" / "cycle_2").exists()  # the last cycle ends in the usual merge
    versions = [r["version"] for r in _records(out, "step") if r["branch"] == "add"]
    assert versions == [1, 2, 4, 5]  # the merge was broadcast as a version of its own


def test_three_branches_hub_and_spoke_from_python(warm_pool, tiny_folder, tmp_path):
    out = tmp_path / "hub"
    cfg = load_config(None, FAST + [
        f"model.path={tiny_folder}", f"output_dir={out}", "schedule.cycles=1", "schedule.rl_steps=0",
        "schedule.opd_steps=1", "eval.every=0", "metrics.pair_every=0",
        "branches=[{name: add}, {name: mul}, {name: mixed, data: [add, mul]}]"])
    train(cfg, topology=Topology.hub_and_spoke("mixed", ["add", "mul"]), pool=warm_pool)
    teachers = {r["branch"]: sorted(k.split("/")[1] for k in r if k.endswith("/teacher_version"))
                for r in _records(out, "step")}
    assert teachers == {"mixed": ["add", "mul"], "add": ["mixed"], "mul": ["mixed"]}
    assert set(json.loads((out / "eval.json").read_text())["eval"]) == {"base", "branch:add", "branch:mul", "branch:mixed", "merged"}


def test_a_frozen_teacher_distils_into_one_student_and_the_budget_adds_up(warm_pool, tiny_folder, tmp_path):
    """Static OPD as configuration: a frozen branch only scores; distillation-only Phase II."""
    out = tmp_path / "static"
    cfg = load_config(None, FAST + [
        f"model.path={tiny_folder}", f"output_dir={out}", "schedule.cycles=1", "schedule.rl_steps=1",
        "schedule.opd_steps=2", "eval.every=0", "metrics.pair_every=2", "opd.native_rl=false", "opd.temperature=0.5",
        f"branches=[{{name: add}}, {{name: teacher, data: [mul], init: {tiny_folder}, frozen: true}}]",
        "topology.kind=edges", "topology.edges=[[teacher, add]]"])
    summary = train(cfg, pool=warm_pool)

    steps = _records(out, "step")
    assert [(r["branch"], r["phase"], r["opd_batches"]) for r in steps] == [("add", "rl", 0), ("add", "opd", 1), ("add", "opd", 1)]
    assert "reward_mean" in steps[0] and all("reward_mean" not in r for r in steps[1:])  # no native batch in Phase II
    assert [r["opd/teacher/teacher_version"] for r in steps[1:]] == [0, 0]  # the teacher never moved
    # 4 prompts x 4 samples of GRPO, then 4 teacher prompts x 2 samples twice; every OPD token scored.
    assert [r["rollouts"] for r in steps] == [16, 8, 8]
    assert summary["budget"] == {"rl_steps": 1, "opd_steps": 2, "rollouts": 32,
                                 "teacher_tokens": sum(r["teacher_tokens"] for r in steps)}
    assert steps[0]["teacher_tokens"] == 0 and all(r["teacher_tokens"] >= 8 for r in steps[1:])
    assert [(p["step"], p["teacher"], p["student"]) for p in _records(out, "pair")] == [(0, "teacher", "add"),
                                                                                        (2, "teacher", "add")]
    assert set(summary["eval"]) == {"base", "branch:add"}  # one trainable branch: nothing to merge
    assert not (out / "branches" / "teacher").exists() and not (out / "merged").exists()


def test_a_branch_no_one_asks_for_log_probs_starts_no_scorer(ray_session, tiny_folder, tmp_path):
    """mul teaches add and nothing measures pairs: add's scorer would never be called. (Cold:
    a WarmPool hands such a branch an idle group with a scorer rather than start processes.)"""
    out = tmp_path / "one_way"
    cfg = load_config(None, FAST + [
        f"model.path={tiny_folder}", f"output_dir={out}", "schedule.cycles=1", "schedule.rl_steps=1",
        "schedule.opd_steps=1", "eval.every=0", "metrics.pair_every=0", "topology.kind=edges",
        "topology.edges=[[mul, add]]"])
    train(cfg)
    actors = json.loads((out / "actors.json").read_text())
    assert "scorer" in actors["mul"] and "scorer" not in actors["add"], actors
    opd = {r["branch"]: r for r in _records(out, "step") if r["phase"] == "opd"}
    assert opd["add"]["teacher_tokens"] > 0 and opd["mul"]["teacher_tokens"] == 0


def test_a_frozen_branch_can_only_teach():
    from copd_ray.config import ConfigError

    frozen = "branches=[{name: add}, {name: mul, init: /tmp, frozen: true}]"
    with pytest.raises(ConfigError, match=r"frozen branch\(es\) \['mul'\] would be students"):
        load_config(None, [frozen])
    with pytest.raises(ConfigError, match="needs an init model folder"):
        load_config(None, ["branches=[{name: add}, {name: mul, frozen: true}]"])
    with pytest.raises(ConfigError, match=r"no teacher"):
        load_config(None, ["opd.native_rl=false", "topology.kind=none"])
    load_config(None, [frozen, "topology.kind=edges", "topology.edges=[[mul, add]]"])


def test_a_branch_without_usable_rows_stops_the_run_naming_it(ray_session, tmp_path, tiny_folder):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1="}\n{oops\n')
    cfg = load_config(None, FAST + [f"model.path={tiny_folder}", f"output_dir={tmp_path / 'o'}",
                                    f"capabilities.1.source={bad}"])
    with pytest.raises(BranchDataError, match=r"branch\(es\) \['mul'\] cannot train: capability 'mul': no usable rows"):
        train(cfg)


def test_a_checkpoint_from_another_base_policy_is_not_resumed(ray_session, tmp_path, tiny_folder):
    out = tmp_path / "o"
    state = out / "checkpoints" / "step_000004" / "driver_state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"step": 4, "drawn": {}, "versions": {}, "base": "/elsewhere/tiny-policy-0"}))
    cfg = load_config(None, FAST + [f"model.path={tiny_folder}", f"output_dir={out}"])
    with pytest.raises(CheckpointError, match="continues a run from the base policy /elsewhere/tiny-policy-0, not "):
        train(cfg)


@pytest.mark.slow
def test_an_interrupted_run_resumes(tmp_path, tiny_folder):
    out = tmp_path / "resume"
    args = [sys.executable, "-m", "copd_ray.cli", "train", *FAST, f"model.path={tiny_folder}", f"output_dir={out}",
            "schedule.cycles=1", "schedule.rl_steps=30", "schedule.opd_steps=0", "schedule.save_every=2",
            "eval.every=0", "metrics.pair_every=0", "ray.num_cpus=2"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             preexec_fn=sigint_reaches_child)
    deadline = time.time() + 240
    while not list(out.glob("checkpoints/step_*/driver_state.json")):
        assert first.poll() is None, first.stdout.read()
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.5)
    first.send_signal(signal.SIGINT)  # Ctrl-C mid-run
    first.wait(timeout=120)
    assert not (out / "eval.json").exists()
    saved = max(json.loads(p.read_text())["step"] for p in out.glob("checkpoints/step_*/driver_state.json"))
    assert saved < 30

    second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"at step {saved}" in second.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    at = next(i for i, r in enumerate(records) if r["kind"] == "event" and r["event"] == "resumed")
    assert records[at]["step"] == saved
    after = [r["step"] for r in records[at:] if r["kind"] == "step" and r["branch"] == "add"]
    assert after == list(range(saved + 1, 31))
    # The steps after the checkpoint that the interrupted run had logged are gone: each once.
    assert [r["step"] for r in records if r["kind"] == "step" and r["branch"] == "add"] == list(range(1, 31))
    summary = json.loads((out / "eval.json").read_text())
    assert summary["steps"] == 30 and summary["budget"]["rl_steps"] == 60 and summary["resumed_at"] == saved
    assert f"steps {saved + 1}-30 of 30 (resumed at step {saved}) in " in second.stdout
    third = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)  # nothing left to run
    assert third.returncode == 0 and "no step to run (resumed at the last, step 30)" in third.stdout, third.stdout
    assert "Token authentication is enabled" not in third.stdout + third.stderr  # a local Ray's notice, filtered


def test_the_serve_token_reaches_no_file_under_output_dir(warm_pool, tiny_folder, tmp_path):
    """A run with live HTTP scoring behind a token, logged to wandb (offline): the token
    is in no file the run writes (wandb's config and metadata, metrics, checkpoints)."""
    from conftest import free_port

    token = "tok-7f3a9c1e5b"
    out = tmp_path / "o"
    cfg = load_config(None, FAST + [f"model.path={tiny_folder}", f"output_dir={out}", "wandb.mode=offline",
                                    "serve.enabled=true", f"serve.port={free_port()}", f"serve.token={token}",
                                    "schedule.cycles=1", "schedule.rl_steps=1", "schedule.opd_steps=1",
                                    "schedule.save_every=1", "eval.every=0", "metrics.pair_every=0"])
    train(cfg, pool=warm_pool)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files) and any(p.name == "driver_state.json" for p in files)
    assert [p for p in files if token.encode() in p.read_bytes()] == []


def test_sharded_trainers_train_checkpoint_resume_and_merge(warm_pool, tiny_folder, tmp_path):
    def run(out, *extra):
        cfg = load_config(None, FAST + [f"model.path={tiny_folder}", f"output_dir={out}", "schedule.cycles=1",
                                        "schedule.rl_steps=2", "schedule.opd_steps=1", "schedule.save_every=2",
                                        "eval.every=0", "metrics.pair_every=0", *extra])
        train(cfg, pool=warm_pool)
        return load_file(str(out / "merged" / "model.safetensors"))

    first = run(tmp_path / "two", "resources.num_trainers=2")
    checkpoint = tmp_path / "two" / "checkpoints" / "step_000002"
    state = torch.load(checkpoint / "branches" / "add" / "trainer_state.pt", weights_only=True)
    assert len(state["rngs"]) == 2 and state["steps"] == 2  # both ranks' shuffle streams
    assert all(isinstance(k, str) for k in state["optimizer"]["state"])  # whole, by parameter name
    AutoModelForCausalLM.from_pretrained(checkpoint / "branches" / "add")

    # Resumed by two ranks: the same run, so the same merged model.
    resumed = run(tmp_path / "again", "resources.num_trainers=2", f"resume={checkpoint}")
    assert max((first[k] - resumed[k]).abs().max().item() for k in first) < 1e-6
    steps = [r["step"] for r in _records(tmp_path / "again", "step") if r["branch"] == "add"]
    assert steps == [3]
    # By one plain rank: the sharded optimizer state loads there too; one step of numerics apart.
    single = run(tmp_path / "one", "resources.num_trainers=1", f"resume={checkpoint}")
    assert max((first[k] - single[k]).abs().max().item() for k in first) < 1e-4
