"""`copd-ray pilot`: the line fit (pure) and the study end to end on a real local Ray."""

import json

import numpy as np
import pytest
from conftest import TINY_COMPARE as TINY

from copd_ray.config import ConfigError, load_config
from copd_ray.pilot import fit_line, pilot_config, run_pilot


def test_fit_line_matches_numpy():
    xs, ys = [0.2, 0.5, 0.55, 0.9, 0.95], [0.01, 0.03, 0.02, 0.08, 0.07]
    fit = fit_line(xs, ys)
    slope, intercept = np.polyfit(xs, ys, 1)
    assert fit["slope"] == pytest.approx(slope) and fit["intercept"] == pytest.approx(intercept)
    assert fit["r"] == pytest.approx(np.corrcoef(xs, ys)[0, 1])


def test_a_pilot_run_is_pure_distillation_from_a_frozen_teacher(tmp_path):
    cfg = pilot_config(load_config(), tmp_path / "experts", "mul", "add", 1.5, 7, tmp_path / "t", check_paths=False)
    student, teacher = cfg.branch_list()
    assert (student.name, student.frozen, teacher.name, teacher.frozen) == ("add", False, "mul", True)
    assert student.init == str(tmp_path / "experts" / "branches" / "add")
    assert (cfg.schedule.rl_steps, cfg.schedule.opd_steps, cfg.opd.native_rl, cfg.opd.temperature) == (0, 7, False, 1.5)
    assert cfg.metrics.pair_every == 7 and cfg.topology.edges == [("mul", "add")]


def test_pilot_measures_overlap_and_gain_per_temperature(ray_session, tiny_folder, tmp_path):
    from rich.console import Console

    cfg = load_config(None, TINY + [f"model.path={tiny_folder}"])
    with pytest.raises(ConfigError, match="at least 3 temperatures"):
        run_pilot(cfg, tmp_path / "p", "mul", "add", [0.5, 1.0], 2, None, Console(quiet=True))
    with pytest.raises(ConfigError, match="'video' is not a branch"):
        run_pilot(cfg, tmp_path / "p", "video", "add", [0.5, 1.0, 2.0], 2, None, Console(quiet=True))

    result = run_pilot(cfg, tmp_path / "p", "mul", "add", [0.3, 1.0, 3.0], 2, None, Console(quiet=True))
    experts = json.loads((tmp_path / "p" / "experts" / "eval.json").read_text())["eval"]["branch:add"]
    for point in result["points"]:
        run = json.loads((tmp_path / "p" / f"tau_{point['temperature']:g}" / "eval.json").read_text())["eval"]
        assert point["gain"] == pytest.approx(run["branch:add"]["mul"] - experts["mul"])
        assert 0 <= point["overlap"] <= 1 and point["symmetric_kl"] >= 0
    assert [p["temperature"] for p in result["points"]] == [0.3, 1.0, 3.0]
    assert set(result["fit"]) == set(result["fit_symmetric_kl"]) == {"slope", "intercept", "r"}
    assert (tmp_path / "p" / "pilot.png").stat().st_size > 0
    assert json.loads((tmp_path / "p" / "pilot.json").read_text())["points"] == result["points"]


def test_divergence_logs_each_expert_against_the_base_and_the_other_along_rlvr(ray_session, tiny_folder, tmp_path):
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

    result = run_divergence(cfg, tmp_path / "d", str(tiny_folder), Console(quiet=True))
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
