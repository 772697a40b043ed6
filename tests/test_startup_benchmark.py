"""benchmarks/startup.py --small: whole processes (copd-ray train lockstep and async; TRL's
row needs its own virtualenv, which CI has none of), and cold against warm actors in one Ray
session (the script checks that every run computes the same numbers before it prints)."""

import json
import subprocess
import sys

import pytest

from conftest import REPO


def run(tmp_path, *args) -> tuple[dict, str]:
    out = tmp_path / "table.json"
    done = subprocess.run([sys.executable, "benchmarks/startup.py", "--small", *args, "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())["table"], done.stdout


@pytest.mark.slow  # two whole copd-ray processes: about a minute on 2 cores
def test_whole_processes_are_timed_part_by_part(tmp_path):
    table, stdout = run(tmp_path, "--steps", "2", "--trl-python", "")
    assert list(table) == ["copd-ray lockstep", "copd-ray async"]
    assert "TRL skipped" in stdout
    for name, r in table.items():
        parts = [r[k] for k in ("outside_train_s", "data_s", "actors_up_s", "steps_s", "final_eval_s")]
        assert all(p >= 0 for p in parts) and sum(parts) == pytest.approx(r["whole_s"], abs=0.05), r
        line = next(line for line in stdout.splitlines() if line.startswith(name))
        assert f"{r['whole_s']:.1f}" in line and f"{r['actors_up_s']:.1f}" in line, line


@pytest.mark.slow  # two short runs: about 40 s on 2 cores
def test_cold_and_warm_runs_are_timed_and_compute_the_same(tmp_path):
    timing, stdout = run(tmp_path, "--warm-pool", "--runs", "1", "--steps", "1")
    assert "every run computed the same step records and evaluation" in stdout
    assert list(timing) == ["cold 1", "warm 1"]
    for t in timing.values():
        assert 0 < t["ray_and_data"] <= t["actors_up"] <= t["first_step"] <= t["trained"] <= t["evaluated"] <= t["done"]
    # The warm run reloads the cold run's actors instead of starting processes.
    assert timing["warm 1"]["actors_up"] - timing["warm 1"]["ray_and_data"] < \
        timing["cold 1"]["actors_up"] - timing["cold 1"]["ray_and_data"]
    assert "means: actors up in" in stdout
