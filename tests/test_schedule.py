"""The phase schedule: Algorithm 1's fixed cycles, and the adaptive schedule driven by pair metrics."""

import json

import pytest

from copd_ray.config import ConfigError, load_config
from copd_ray.schedule import Phases, schedule

EDGES = [("add", "mul"), ("mul", "add")]


def _cfg(*overrides):
    return load_config(None, ["wandb.mode=disabled", *overrides])


def _pair(step, teacher, student, kl, overlap=0.95):
    return {"kind": "pair", "step": step, "teacher": teacher, "student": student, "symmetric_kl": kl,
            "topk_overlap": overlap}


def test_the_fixed_schedule_gives_every_branch_the_plans_phase():
    cfg = _cfg("schedule.cycles=2", "schedule.rl_steps=2", "schedule.opd_steps=1")
    phases = Phases(cfg, ["add", "mul"], EDGES)
    got = [phases.at(s) for s in range(1, 7)]
    assert [g["add"] for g in got] == ["rl", "rl", "opd", "rl", "rl", "opd"] == [p for _, p in schedule(cfg)]
    assert all(g["add"] == g["mul"] for g in got)


def test_adaptive_switches_when_the_fed_metric_crosses_and_back_when_it_recovers():
    cfg = _cfg("schedule.kind=adaptive", "schedule.kl_high=0.5", "schedule.min_phase=2",
               "schedule.cycles=1", "schedule.rl_steps=6", "schedule.opd_steps=4")
    phases = Phases(cfg, ["add", "mul"], EDGES)
    phases.observe([_pair(0, "mul", "add", 0.0), _pair(0, "add", "mul", 0.0)])
    seen = [phases.at(1)]
    phases.observe([_pair(1, "mul", "add", 0.9)])  # add drifts from its teacher after one step
    seen += [phases.at(2), phases.at(3)]  # ... but stays min_phase = 2 steps in Phase I first
    seen += [phases.at(4), phases.at(5)]
    phases.observe([_pair(5, "mul", "add", 0.3)])  # back inside the threshold
    seen += [phases.at(s) for s in (6, 7)]
    assert [p["add"] for p in seen] == ["rl", "rl", "opd", "opd", "opd", "rl", "rl"]
    assert [p["mul"] for p in seen] == ["rl"] * 7  # its own teacher's metric never moved

    # Every step gives every branch one phase: the budget is the fixed schedule's step count.
    assert len(schedule(cfg)) == 10


def test_adaptive_reads_the_overlap_threshold_and_ignores_pairs_that_are_not_edges():
    cfg = _cfg("schedule.kind=adaptive", "schedule.overlap_low=0.9", "schedule.kl_high=null", "schedule.min_phase=1")
    phases = Phases(cfg, ["add", "mul"], [("mul", "add")])  # mul has no teacher
    phases.observe([_pair(0, "mul", "add", 9.0, overlap=0.85), _pair(0, "add", "mul", 9.0, overlap=0.1)])
    assert phases.at(1) == {"add": "rl", "mul": "rl"}  # min_phase: one step of Phase I first
    assert phases.at(2) == {"add": "opd", "mul": "rl"}
    phases.observe([_pair(2, "mul", "add", 9.0, overlap=0.91)])  # the KL is ignored: kl_high is off
    assert phases.at(3) == {"add": "rl", "mul": "rl"}


def test_replaying_a_runs_records_rebuilds_the_live_state():
    cfg = _cfg("schedule.kind=adaptive", "schedule.kl_high=0.5", "schedule.min_phase=2")
    live = Phases(cfg, ["add", "mul"], EDGES)
    records, kls = [], {1: 0.2, 2: 0.7, 4: 0.8, 6: 0.1, 7: 0.6}
    for step in range(1, 9):
        for branch, phase in live.at(step).items():
            records.append({"kind": "step", "step": step, "branch": branch, "phase": phase})
        if step in kls:
            pairs = [_pair(step, "mul", "add", kls[step]), _pair(step, "add", "mul", kls[step] / 2)]
            live.observe(pairs)
            records += pairs
    replayed = Phases(cfg, ["add", "mul"], EDGES)
    replayed.replay(records)
    assert (replayed.phase, replayed.length, replayed.latest) == (live.phase, live.length, live.latest)
    assert [replayed.at(s) for s in (9, 10, 11)] == [live.at(s) for s in (9, 10, 11)]


@pytest.mark.parametrize("overrides, words", [
    (["schedule.kind=adaptive", "schedule.kl_high=null"], "overlap_low or schedule.kl_high"),
    (["schedule.kind=adaptive", "schedule.max_staleness=1"], "max_staleness=0"),
    (["schedule.kind=adaptive", "metrics.pair_every=0"], "pair_every > 0"),
    (["schedule.kind=adaptive", "topology.kind=none"], "no branch has a teacher"),
    (["schedule.kind=sometimes"], "schedule.kind"),
])
def test_a_bad_adaptive_config_names_what_is_wrong(overrides, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.").replace("(", r"\(")):
        _cfg(*overrides)


def test_an_adaptive_run_switches_by_its_logged_metrics_and_spends_exactly_the_budget(warm_pool, tiny_folder,
                                                                                       tmp_path):
    from copd_ray.driver import train
    from test_driver import FAST

    import torch

    from copd_ray.models import save_policy
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The untrained policy earns no reward, so RL alone never moves it: mul starts from a
    # perturbed copy instead, and the pair crosses a tiny KL threshold from the start.
    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other = save_policy(model, AutoTokenizer.from_pretrained(tiny_folder), tmp_path / "other")
    out = tmp_path / "adaptive"
    cfg = load_config(None, FAST + [f"model.path={tiny_folder}", f"output_dir={out}", "schedule.kind=adaptive",
                                    f"branches=[{{name: add}}, {{name: mul, init: {other}}}]",
                                    "schedule.kl_high=1e-6", "schedule.min_phase=2", "schedule.cycles=1",
                                    "schedule.rl_steps=3", "schedule.opd_steps=2", "metrics.pair_every=1",
                                    "eval.every=0"])
    summary = train(cfg, pool=warm_pool)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    pairs = [r for r in records if r["kind"] == "pair"]
    # The rule written out plainly: at step s a branch leaves its phase once it has spent
    # min_phase steps there and its teacher's KL, as last measured (after step s - 1),
    # says the other phase.
    for branch, teacher in (("add", "mul"), ("mul", "add")):
        phase, length, expected = "rl", 0, []
        for s in range(1, 6):
            kl = [p["symmetric_kl"] for p in pairs if p["student"] == branch and p["teacher"] == teacher
                  and p["step"] <= s - 1][-1]
            if length >= 2 and (kl > 1e-6) == (phase == "rl"):
                phase, length = ("opd" if phase == "rl" else "rl"), 0
            length += 1
            expected.append(phase)
        assert [r["phase"] for r in steps if r["branch"] == branch] == expected
        assert "opd" in expected  # the threshold was crossed and the branch distilled
    assert summary["budget"]["rl_steps"] + summary["budget"]["opd_steps"] == 2 * 5
    assert any(k.endswith("/teacher_version") for r in steps if r["phase"] == "opd" for k in r)
