"""The README's main job: `copd-ray train configs/demo.yaml`, as a user runs it the first
time (the warm-up of the tiny policy included, checked here too), then `copd-ray eval` of
the cached base."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO


@pytest.mark.slow
def test_demo_runs_within_ten_minutes_and_each_branch_learns_its_capability(tmp_path):
    out, cache = tmp_path / "demo", tmp_path / "cache"
    cli = [sys.executable, "-m", "copd_ray.cli"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = time.perf_counter()
    run = subprocess.run(cli + ["train", str(REPO / "configs" / "demo.yaml"), f"output_dir={out}",
                                f"cache_dir={cache}", "wandb.mode=offline"],
                         capture_output=True, text=True, timeout=1200, env=env)
    minutes = (time.perf_counter() - start) / 60
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert minutes < 10, f"the demo took {minutes:.1f} minutes"
    result = json.loads((out / "eval.json").read_text())["eval"]
    assert result["branch:add"]["add"] > result["base"]["add"]
    assert result["branch:mul"]["mul"] > result["base"]["mul"]
    for name in ("accuracy.png", "pair_metrics.png", "metrics.jsonl", "merged/model.safetensors"):
        assert (out / name).exists(), name
    assert list((out / "wandb").glob("offline-run-*"))
    assert "sync+score share" in run.stdout

    # The warm-up it began with (the embedded default's, whose cache key the demo shares).
    record = json.loads(next(cache.glob("tiny-policy-*/bootstrap.json")).read_text())
    assert record["landed"] and record["in_range"] and all(0.3 <= r <= 0.65 for r in record["rates"].values()), record
    assert f"trained {record['steps_run']} steps" in run.stdout and record["steps"] == record["steps_run"]
    assert record["seconds"] < 300, f"the warm-up took {record['seconds']} s"
    assert "validation pass@1 add" in run.stdout and "warning" not in run.stdout
    evaluated = subprocess.run(cli + ["eval", f"cache_dir={cache}"], capture_output=True, text=True, timeout=600,
                               env=env)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    assert "(cached)" in evaluated.stdout
    # The saved and reloaded policy scores exactly what the warm-up measured in memory, on
    # the validation problems it chose the checkpoint by.
    from copd_ray.capabilities import build_capability
    from copd_ray.config import load_config
    from copd_ray.engines import HFEngine
    from copd_ray.evaluation import evaluate
    from copd_ray.models.loading import load_policy

    cfg = load_config(None, [f"cache_dir={cache}"])
    model, tok = load_policy(str(next(cache.glob("tiny-policy-*"))))
    engine = HFEngine(model, tok.eos_token_id, tok.pad_token_id)
    for c in cfg.capabilities:
        cap = build_capability(c, cfg.seed)
        rate = evaluate(engine, tok, cap.validation, cap.reward, cap.template, cfg.eval.max_new_tokens)["pass_rate"]
        assert rate == record["rates"][c.name], c.name
