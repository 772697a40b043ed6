"""benchmarks/startup.py --small: cold and warm runs in one Ray session compute the same
numbers (the script checks it before it prints), and every run's timing is printed."""

import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow  # four short runs: about 2 minutes on 2 cores
def test_cold_and_warm_runs_are_timed_and_compute_the_same(tmp_path):
    out = tmp_path / "table.json"
    run = subprocess.run([sys.executable, "benchmarks/startup.py", "--small", "--runs", "2", "--steps", "1",
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "every run computed the same step records and evaluation" in run.stdout
    timing = json.loads(out.read_text())["timing"]
    assert list(timing) == ["cold 1", "cold 2", "warm 1", "warm 2"]
    for t in timing.values():
        assert 0 < t["ray_and_data"] <= t["actors_up"] <= t["first_step"] <= t["trained"] <= t["evaluated"] <= t["done"]
    # The second warm run reloads the first's actors instead of starting processes.
    assert timing["warm 2"]["actors_up"] - timing["warm 2"]["ray_and_data"] < \
        timing["cold 2"]["actors_up"] - timing["cold 2"]["ray_and_data"]
