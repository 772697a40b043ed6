"""benchmarks/grpo_vs_trl.py --small: copd-ray sync and async (and TRL's GRPOTrainer where
its virtualenv exists; CI has none, and the row is then skipped with a note) on the
untrained tiny policy; every row's table numbers are printed, present and positive."""

import json
import subprocess
import sys

from conftest import REPO


# About 65 s on 2 idle cores (Ray and the actors start three times), 70 s with the TRL row: not marked slow.
def test_the_small_benchmark_prints_every_row(tmp_path):
    out = tmp_path / "table.json"
    result = subprocess.run([sys.executable, "benchmarks/grpo_vs_trl.py", "--small", "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    table = json.loads(out.read_text())
    rows = table["rows"]
    timed = ["copd-ray sync", "copd-ray async", "copd-ray async, whole rows"] + (
        ["TRL GRPOTrainer"] if "TRL GRPOTrainer" in rows else [])
    if len(timed) == 3:
        assert any(n.startswith("TRL: skipped") for n in table["notes"]), table["notes"]
    for name in timed:
        r = rows[name]
        assert r["steps_timed"] == 4, r  # steps 3..6 of 6
        assert r["s_per_step"] > 0 and r["mean_s_per_step"] > 0 and r["rollouts_per_s"] > 0, r
        assert 0.0 <= r["pass@1"] <= 1.0, r
        line = next(line for line in result.stdout.splitlines() if line.startswith(f"{name:<26}"))
        assert f"{r['s_per_step']:.3f}" in line and f"{r['rollouts_per_s']:.1f}" in line, line
    assert 0.0 <= rows["base (no training)"]["pass@1"] <= 1.0
