"""`copd-ray bootstrap` and the warm-up's rules on the tiny policy (the full warm-up, with `copd-ray
eval` of its result, runs at the start of the demo: tests/test_demo.py)."""

import json

import pytest
from typer.testing import CliRunner

from copd_ray.cli import app


def test_short_bootstrap_caches_by_settings(tmp_path):
    runner = CliRunner()
    args = ["bootstrap", f"cache_dir={tmp_path}", "bootstrap.max_steps=20", "bootstrap.eval_every=10",
            "capabilities.0.heldout_size=50", "capabilities.1.heldout_size=50"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    folders = list(tmp_path.glob("tiny-policy-*"))
    assert len(folders) == 1 and (folders[0] / "model.safetensors").exists()
    record = json.loads((folders[0] / "bootstrap.json").read_text())
    assert set(record["rates"]) == {"add", "mul"} and record["steps"] in (10, 20) and record["steps_run"] == 20
    assert not record["landed"]  # 20 steps cannot reach the window
    assert "bootstrap step    10" in first.output
    assert (f"trained 20 steps in {record['seconds']} s, kept the checkpoint of step {record['steps']}, the closest "
            "to the window" in first.output)
    for name, rate in record["rates"].items():
        assert f"warning: {name} {rate:.3f} is under its window [0.2, 0.65]" in first.output

    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "cached" in second.output and "bootstrap step" not in second.output
    other = runner.invoke(app, args[:-1] + ["capabilities.1.heldout_size=60"])
    assert other.exit_code == 0 and len(list(tmp_path.glob("tiny-policy-*"))) == 2
    assert record["measured_on"] == "validation" and "validation pass@1 add" in first.output
    blind = runner.invoke(app, args + ["capabilities.1.validation_size=0"])  # picks on held-out: said so
    assert blind.exit_code == 0 and "held-out pass@1 add" in blind.output
    assert "warning: capabilities ['mul'] have no validation set" in blind.output.replace("\n", " ")


def test_the_warm_up_warns_per_capability_outside_its_window_or_aim():
    from copd_ray.config import BootstrapConfig
    from copd_ray.bootstrap import rate_warnings

    b = BootstrapConfig()  # window [0.2, 0.65], aim 0.3, 0.1 above guessing
    rates = {"add": 0.7, "mul": 0.268, "image": 0.4, "text": 0.45, "low": 0.1}
    guess = {"add": 0.01, "mul": 0.01, "image": 0.35, "text": 0.01, "low": 0.0}
    assert rate_warnings(rates, guess, b) == [
        "add 0.700 is over its window [0.2, 0.65]",
        "mul 0.268 is under its aim 0.3",
        "image 0.400 is under its window [0.45, 0.65]",  # 0.1 above always answering the commonest answer
        "low 0.100 is under its window [0.2, 0.65]",
    ]
    assert rate_warnings({"add": 0.268}, {}, b) == ["add 0.268 is under its aim 0.3"]  # records from before guessing


def test_bad_config_fails_before_any_work(tmp_path):
    result = CliRunner().invoke(app, ["train", f"cache_dir={tmp_path}", "capabilities.0.reward=bleu"])
    assert result.exit_code == 2 and "unknown reward 'bleu'" in result.output
    assert not list(tmp_path.iterdir())


def test_the_warm_up_window_starts_above_guessing():
    from copd_ray.capabilities import build_capability
    from copd_ray.config import load_config
    from copd_ray.data import PromptRecord
    from copd_ray.evaluation import guessing_rate
    from copd_ray.bootstrap import guess_floors

    answers = ["4", "4", "4", "2", "1 ", "3", "4", "2", "1", "3"]
    assert guessing_rate([PromptRecord(str(i), a, "c", prompt="count:") for i, a in enumerate(answers)]) == 0.4

    cfg = load_config("configs/demo_multimodal.yaml", [])
    caps = {c.name: build_capability(c, cfg.seed) for c in cfg.capabilities}
    guess, floors = guess_floors(caps, cfg.bootstrap)
    held = caps["image"].heldout
    assert guess["image"] == max(sum(r.answer == a for r in held) for a in "1234") / len(held)
    assert floors["image"] == pytest.approx(guess["image"] + cfg.bootstrap.above_guess)
    assert floors["image"] > cfg.bootstrap.aim
    assert floors["text"] == cfg.bootstrap.aim  # addition: guessing scores ~1%, the aim rules

    tight = load_config("configs/demo_multimodal.yaml", ["bootstrap.high=0.4"])
    with pytest.raises(ValueError, match="capability 'image': always giving its most common answer scores 0.35"):
        guess_floors(caps, tight.bootstrap)


def test_a_warm_up_that_cannot_land_stops_once_nothing_lags_and_nothing_improves(monkeypatch):
    from copd_ray import bootstrap
    from copd_ray.config import load_config

    floors = {"a": 0.45, "b": 0.3}
    over = bootstrap._distance({"a": 0.9, "b": 0.3}, floors, high=0.6)
    lagging = bootstrap._distance({"a": 0.9, "b": 0.29}, floors, high=0.6)
    assert over == (False, pytest.approx(0.3)) and lagging == (True, pytest.approx(0.31))
    assert bootstrap.settled(over, evals_since_best=2, patience=2)
    assert not bootstrap.settled(lagging, evals_since_best=9, patience=2)
    assert not bootstrap.settled(over, evals_since_best=1, patience=2)

    # Scripted held-out rates per evaluation (the real loop trains between them): add overshoots
    # `high` (0.65) and climbs; mul is past its floor (0.3) from the first evaluation.
    def run(script):
        it = iter(script)
        monkeypatch.setattr(bootstrap, "evaluate", lambda *a, **k: {"pass_rate": next(it)})
        cfg = load_config(None, ["bootstrap.max_steps=60", "bootstrap.eval_every=10", "bootstrap.patience=2",
                                 "bootstrap.batch_size=4", "capabilities.0.heldout_size=20",
                                 "capabilities.1.heldout_size=20"])
        return bootstrap.run_bootstrap(cfg)

    flat = [0.7, 0.4, 0.8, 0.4, 0.9, 0.5, 0.9, 0.5, 0.9, 0.5, 0.9, 0.5]  # add, mul per evaluation
    stopped = run(flat)
    assert (stopped["steps"], stopped["steps_run"], stopped["landed"]) == (10, 30, False)
    assert stopped["rates"] == {"add": 0.7, "mul": 0.4}

    # Closest is not enough: a checkpoint with mul near guessing loses to one where nothing lags.
    closer_but_lagging = [0.25, 0.4, 0.75, 0.4, 0.9, 0.4, 0.9, 0.4]  # distances 0.05 (add lags), 0.10, ...
    kept = run(closer_but_lagging)
    assert (kept["steps"], kept["steps_run"], kept["rates"]) == (20, 40, {"add": 0.75, "mul": 0.4})

    lagging = [0.7, 0.1, 0.8, 0.1, 0.9, 0.1, 0.9, 0.1, 0.9, 0.1, 0.9, 0.1]  # mul never catches up
    kept_going = run(lagging)
    assert (kept_going["steps"], kept_going["steps_run"]) == (10, 60)
