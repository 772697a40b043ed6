"""benchmarks/grpo_vs_trl.py --small: copd-ray rows on the untrained tiny policy; every row's
table numbers are printed, present and positive. TRL's row needs a virtualenv of its own
(CI has none): the test leaves it out, and the table says so."""

import json
import subprocess
import sys

import pytest

from conftest import REPO


# Two rows (lockstep and async: the two ways a step runs; the third row is async with another
# train setting) in about 35 s on 2 idle cores.
@pytest.mark.slow
def test_the_small_benchmark_prints_every_row(tmp_path):
    out = tmp_path / "table.json"
    result = subprocess.run([sys.executable, "benchmarks/grpo_vs_trl.py", "--small", "--rows", "sync,async,trl",
                             "--trl-python", "", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    table = json.loads(out.read_text())
    rows = table["rows"]
    assert set(rows) == {"base (no training)", "copd-ray sync", "copd-ray async"}
    assert any(n.startswith("TRL: skipped (--trl-python '' given)") for n in table["notes"]), table["notes"]
    for name in ("copd-ray sync", "copd-ray async"):
        r = rows[name]
        assert r["steps_timed"] == 4, r  # steps 3..6 of 6
        assert r["s_per_step"] > 0 and r["mean_s_per_step"] > 0 and r["rollouts_per_s"] > 0, r
        assert 0.0 <= r["pass@1"] <= 1.0 and r["run_pass"] == r["pass@1"], r
        line = next(line for line in result.stdout.splitlines() if line.startswith(f"{name:<26}"))
        assert f"{r['s_per_step']:.3f}" in line and f"{r['rollouts_per_s']:.1f}" in line, line
    assert 0.0 <= rows["base (no training)"]["pass@1"] <= 1.0
