"""The README's main job: `copd-ray train configs/demo.yaml`, as a user runs it."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO


@pytest.mark.slow
def test_demo_runs_within_ten_minutes_and_each_branch_learns_its_capability(tmp_path):
    out = tmp_path / "demo"
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "copd_ray.cli", "train", str(REPO / "configs" / "demo.yaml"),
         f"output_dir={out}", f"cache_dir={tmp_path / 'cache'}", "wandb.mode=offline"],
        capture_output=True, text=True, timeout=1200, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
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
