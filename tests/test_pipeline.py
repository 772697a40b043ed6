"""The step inside the branch: what reaches the driver, lockstep reproducing the run
before the step moved, and branches on their own clocks (schedule.max_staleness)."""

import json
import math
import shutil
from pathlib import Path

import pytest

from conftest import FAST
from copd_ray.config import load_config
from copd_ray.driver import train

# A shaped reward gives the untrained policy a GRPO signal from the first step.
SHAPED = ["capabilities.0.reward=char_overlap", "capabilities.1.reward=char_overlap", "grpo.lr=0.005"]
GOLDEN = Path(__file__).parent / "data" / "golden_sync_steps.json"
EXACT = {"reward_mean", "pass_rate", "response_length", "rollouts", "teacher_tokens"}  # what sampling decided


def _records(out, kind):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def test_lockstep_reproduces_the_run_from_before_the_step_moved_into_the_branch(warm_pool, tiny_folder, tmp_path):
    """tests/data/golden_sync_steps.json: the step records (time/* left out) of this very
    config, written by the driver of commit 3b597d3, which still passed every rollout and
    score through the driver. What sampling decided (rewards, lengths, counts) must be the
    same exactly; the losses, norms and entropies to float rounding, which depends on the CPU
    (the file was written on another one) and on reading each prompt once
    (train.share_prompts, on by default; whole rows then): a loss near 0 is a cancellation
    of terms ~0.05, so 1e-6 is its absolute tolerance."""
    out = tmp_path / "run"
    cfg = load_config(None, FAST + SHAPED + [f"model.path={tiny_folder}", f"output_dir={out}", "schedule.cycles=1",
                                             "schedule.rl_steps=2", "schedule.opd_steps=2", "eval.every=0",
                                             "metrics.pair_every=2"])
    train(cfg, pool=warm_pool)
    golden = json.loads(GOLDEN.read_text())
    steps = sorted(_records(out, "step"), key=lambda r: (r["step"], r["branch"]))
    assert len(steps) == len(golden) == 8
    for new, old in zip(steps, sorted(golden, key=lambda r: (r["step"], r["branch"]))):
        for key, value in old.items():
            sampled = key in EXACT or key.endswith("/reward_mean") or not isinstance(value, float)
            assert new[key] == (value if sampled else pytest.approx(value, rel=1e-4, abs=1e-6)), (
                old["step"], old["branch"], key, value, new[key])
        assert new["lag/steps"] == 0 and new["is/weight_mean"] == 1.0  # on-policy: no importance weight
    assert any(r["loss"] != 0 for r in golden)  # the comparison has something to compare


def test_what_the_driver_receives_does_not_grow_with_the_batch(warm_pool, tiny_folder, tmp_path):
    """Four times the prompts (and rollouts, tokens, teacher log-probs): the same bytes."""
    received = {}
    for prompts in (2, 8):
        out = tmp_path / f"p{prompts}"
        cfg = load_config(None, FAST + [
            f"model.path={tiny_folder}", f"output_dir={out}", "schedule.cycles=1", "schedule.rl_steps=1",
            "schedule.opd_steps=1", "eval.every=0", "metrics.pair_every=0", f"grpo.prompts_per_step={prompts}",
            f"opd.prompts_per_teacher={prompts}", "grpo.max_new_tokens=12"])
        train(cfg, pool=warm_pool)
        steps = _records(out, "step")
        received[prompts] = {(r["branch"], r["phase"]): (r["driver/bytes_received"], r["rollouts"], r["teacher_tokens"])
                             for r in steps}
    for key, (small_bytes, small_rollouts, small_tokens) in received[2].items():
        big_bytes, big_rollouts, big_tokens = received[8][key]
        assert big_rollouts == 4 * small_rollouts
        assert big_tokens >= 2 * small_tokens  # the OPD step scored many more tokens...
        assert abs(big_bytes - small_bytes) <= 64 and big_bytes < 4096  # ... and the driver got the same record


def test_branches_on_their_own_clocks_train_lag_at_most_k_checkpoint_and_resume(warm_pool, tiny_folder, tmp_path):
    out = tmp_path / "async"
    base = FAST + SHAPED + [f"model.path={tiny_folder}", f"output_dir={out}", "schedule.cycles=1",
                            "schedule.rl_steps=4", "schedule.opd_steps=2", "schedule.max_staleness=1",
                            "schedule.save_every=0", "eval.every=3", "metrics.pair_every=2"]
    train(load_config(None, base), pool=warm_pool)
    steps = _records(out, "step")
    assert sorted((r["step"], r["branch"]) for r in steps) == [(s, b) for s in range(1, 7) for b in ("add", "mul")]
    for r in steps:
        assert 0 <= r["lag/steps"] <= 1
        assert r["lag/trainer_version"] - r["lag/behaviour_version"] == r["lag/steps"]
        assert 0 < r["is/weight_mean"] <= 2.0 and 0 <= r["is/truncated"] <= 1
    # Within a phase the pipeline runs one step ahead; at the phase barrier it refills.
    lags = {(r["branch"], r["step"]): r["lag/steps"] for r in steps}
    assert [lags[("add", s)] for s in range(1, 7)] == [0, 1, 1, 1, 0, 1]
    assert all(not math.isnan(r["loss"]) for r in steps)
    assert {(p["teacher"], p["student"]) for p in _records(out, "pair") if p["step"] > 0} == {("add", "mul"), ("mul", "add")}
    assert {(e["step"], e["branch"]) for e in _records(out, "eval")} >= {(3, "add"), (3, "mul"), (6, "add")}

    # A checkpoint at step 4 (the phase barrier), the rest replayed from it: the replayed
    # steps' own-branch numbers (lags, rewards of the branch's own rollouts) are the same.
    out2 = tmp_path / "resumed"
    cfg = FAST + SHAPED + [f"model.path={tiny_folder}", f"output_dir={out2}", "schedule.cycles=1",
                           "schedule.rl_steps=4", "schedule.opd_steps=2", "schedule.max_staleness=1",
                           "schedule.save_every=4", "eval.every=0", "metrics.pair_every=0"]
    train(load_config(None, cfg), pool=warm_pool)
    whole = {(r["step"], r["branch"]): r for r in _records(out2, "step")}
    shutil.rmtree(out2 / "checkpoints" / "step_000006")
    summary = train(load_config(None, cfg + ["resume=auto"]), pool=warm_pool)
    assert [e["from"].rsplit("/", 1)[-1] for e in _records(out2, "event") if e["event"] == "resumed"] == ["step_000004"]
    resumed = {(r["step"], r["branch"]): r for r in _records(out2, "step")}
    assert sorted(resumed) == sorted(whole)
    for key in [(5, "add"), (5, "mul"), (6, "add"), (6, "mul")]:
        assert resumed[key]["lag/steps"] == whole[key]["lag/steps"] == (0 if key[0] == 5 else 1)
        assert resumed[key]["reward_mean"] == whole[key]["reward_mean"]
    assert set(summary["eval"]) == {"base", "branch:add", "branch:mul", "merged"}


def test_two_identical_async_runs_log_the_same_steps_and_teachers_keep_the_bound(warm_pool, tiny_folder, tmp_path):
    """schedule.max_staleness=2 over one segment of six steps, five of them OPD: each teacher
    scores step s with its weights of step max(0, s - 3), the same lag as the student's own
    rollouts, whatever the timing; so two runs log the same step records (times aside)."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        train(load_config(None, FAST + SHAPED + [
            f"model.path={tiny_folder}", f"output_dir={out}", "schedule.cycles=1", "schedule.rl_steps=1",
            "schedule.opd_steps=5", "schedule.max_staleness=2", "schedule.phase_barrier=false",
            "schedule.save_every=0", "eval.every=0", "metrics.pair_every=0"]), pool=warm_pool)
        runs.append({(r["step"], r["branch"]): {k: v for k, v in r.items() if not k.startswith("time/")}
                     for r in _records(out, "step")})
    assert len(runs[0]) == 12 and runs[0] == runs[1]
    for (step, branch), r in runs[0].items():
        teacher = "mul" if branch == "add" else "add"
        assert r["lag/steps"] == min(step - 1, 2)
        if step > 1:
            assert r[f"opd/{teacher}/teacher_version"] == max(0, step - 3) == r["lag/behaviour_version"]
