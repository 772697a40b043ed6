"""`copd-ray pilot`: the line fit (pure) and the study end to end on a real local Ray."""

import json

import numpy as np
import pytest
from conftest import TINY_COMPARE as TINY

from copd_ray.config import ConfigError, load_config
from copd_ray.pilot import fit_line, pilot_config, rlvr_config, run_pilot


def test_fit_line_matches_numpy():
    xs, ys = [0.2, 0.5, 0.55, 0.9, 0.95], [0.01, 0.03, 0.02, 0.08, 0.07]
    fit = fit_line(xs, ys)
    slope, intercept = np.polyfit(xs, ys, 1)
    assert fit["slope"] == pytest.approx(slope) and fit["intercept"] == pytest.approx(intercept)
    assert fit["r"] == pytest.approx(np.corrcoef(xs, ys)[0, 1])


def test_a_pilot_run_is_pure_distillation_from_a_frozen_teacher(tmp_path):
    cfg = pilot_config(load_config(), tmp_path / "s", tmp_path / "t", "mul", "add", 1.5, 7, tmp_path / "r",
                       check_paths=False)
    student, teacher = cfg.branch_list()
    assert (student.name, student.frozen, teacher.name, teacher.frozen) == ("add", False, "mul", True)
    assert (student.init, teacher.init) == (str(tmp_path / "s"), str(tmp_path / "t"))
    assert (cfg.schedule.rl_steps, cfg.schedule.opd_steps, cfg.opd.native_rl, cfg.opd.temperature) == (0, 7, False, 1.5)
    assert cfg.metrics.pair_every == 7 and cfg.topology.edges == [("mul", "add")]
    same = pilot_config(load_config(), tmp_path / "s", tmp_path / "t", "mul", "add", None, 7, tmp_path / "r",
                        check_paths=False)
    assert same.opd.temperature is None  # the paper's design: one OPD temperature, the config's


def test_a_pilot_student_is_trained_by_rlvr_alone_at_its_temperature(tmp_path):
    cfg = rlvr_config(load_config(), "add", 1.7, 30, tmp_path / "r", check_paths=False)
    (student,) = cfg.branch_list()
    assert (student.name, student.init, student.frozen) == ("add", None, False)  # from the base
    assert (cfg.grpo.temperature, cfg.schedule.rl_steps, cfg.schedule.opd_steps) == (1.7, 30, 0)
    assert cfg.topology.kind == "none"


@pytest.mark.parametrize("design", ["rlvr-temperature", pytest.param("opd-temperature", marks=pytest.mark.slow)])
def test_pilot_measures_overlap_and_gain_per_temperature(warm_pool, tiny_folder, tmp_path, design):
    from rich.console import Console

    # A shaped reward gives the untrained policy a GRPO signal, so RLVR at each tau moves it.
    cfg = load_config(None, TINY + [f"model.path={tiny_folder}", "capabilities.0.reward=char_overlap",
                                    "capabilities.1.reward=char_overlap", "grpo.lr=0.005"])
    quiet = Console(quiet=True)
    with pytest.raises(ConfigError, match="at least 3 temperatures"):
        run_pilot(cfg, tmp_path / "p", "mul", "add", [0.5, 1.0], 2, None, quiet, design)
    with pytest.raises(ConfigError, match="'video' is not a branch"):
        run_pilot(cfg, tmp_path / "p", "video", "add", [0.5, 1.0, 2.0], 2, None, quiet, design)
    with pytest.raises(ConfigError, match="design 'both'"):
        run_pilot(cfg, tmp_path / "p", "mul", "add", [0.5, 1.0, 2.0], 2, None, quiet, "both")

    result = run_pilot(cfg, tmp_path / "p", "mul", "add", [0.3, 1.0, 3.0], 2, None, quiet, design, rl_steps=2,
                       pool=warm_pool)
    experts = json.loads((tmp_path / "p" / "experts" / "eval.json").read_text())["eval"]["branch:add"]
    for point in result["points"]:
        tau = point["temperature"]
        if design == "rlvr-temperature":
            before = json.loads((tmp_path / "p" / f"rlvr_tau_{tau:g}" / "eval.json").read_text())["eval"]["branch:add"]
            opd = tmp_path / "p" / f"opd_after_tau_{tau:g}"
            rl = [json.loads(line) for line in (tmp_path / "p" / f"rlvr_tau_{tau:g}" / "metrics.jsonl").open()]
            assert [r["phase"] for r in rl if r["kind"] == "step"] == ["rl", "rl"]
        else:
            before, opd = experts, tmp_path / "p" / f"tau_{tau:g}"
        run = json.loads((opd / "eval.json").read_text())["eval"]
        assert point["gain"] == pytest.approx(run["branch:add"]["mul"] - before["mul"])
        assert 0 <= point["overlap"] <= 1 and point["symmetric_kl"] >= 0
        steps = [json.loads(line) for line in (opd / "metrics.jsonl").open()]
        assert [r["phase"] for r in steps if r["kind"] == "step"] == ["opd", "opd"]
    if design == "rlvr-temperature":  # the students really differ before OPD: RLVR at each tau moved them apart
        assert len({round(p["symmetric_kl"], 6) for p in result["points"]}) == 3
    assert [p["temperature"] for p in result["points"]] == [0.3, 1.0, 3.0]
    assert result["design"] == design
    assert set(result["fit"]) == set(result["fit_symmetric_kl"]) == set(result["fit_start_accuracy"]) == {
        "slope", "intercept", "r"}
    assert (tmp_path / "p" / "pilot.png").stat().st_size > 0
    assert json.loads((tmp_path / "p" / "pilot.json").read_text())["points"] == result["points"]


def test_divergence_logs_each_expert_against_the_base_and_the_other_along_rlvr(warm_pool, tiny_folder, tmp_path):
    """Experiment 2 (Figure 2 c-d): the experts train alone by RLVR beside the frozen base;
    every ordered pair with a training student is measured at every pair_every steps."""
    from rich.console import Console

    from copd_ray.pilot import divergence_config, run_divergence

    # A shaped reward gives the untrained policy a GRPO signal from the first step.
    cfg = load_config(None, TINY + [f"model.path={tiny_folder}", "capabilities.0.reward=char_overlap",
                                    "capabilities.1.reward=char_overlap", "grpo.lr=0.005"])
    run = divergence_config(cfg, str(tiny_folder), tmp_path / "d" / "experts", check_paths=False)
    assert [(b.name, b.frozen) for b in run.branch_list()] == [("add", False), ("mul", False), ("base", True)]
    assert run.topology.kind == "none" and run.metrics.pairs == "all" and run.schedule.opd_steps == 0

    result = run_divergence(cfg, tmp_path / "d", str(tiny_folder), Console(quiet=True), pool=warm_pool)
    assert set(result["curves"]) == {"base→add", "mul→add", "base→mul", "add→mul"}
    steps = run.schedule.rl_steps
    for pair, points in result["curves"].items():
        assert [p["step"] for p in points] == list(range(steps + 1))  # pair_every=1: step 0 to the last
        assert all(0.0 <= p["overlap"] <= 1.0 and p["symmetric_kl"] >= 0.0 for p in points)
    # At step 0 every expert is the base: overlap 1, KL 0, against it and each other.
    assert all(points[0]["overlap"] == 1.0 and points[0]["symmetric_kl"] < 1e-6 for points in result["curves"].values())
    assert any(points[-1]["symmetric_kl"] > 1e-4 for points in result["curves"].values())  # then they move
    assert (tmp_path / "d" / "divergence.png").stat().st_size > 0
    assert json.loads((tmp_path / "d" / "divergence.json").read_text())["curves"] == result["curves"]
