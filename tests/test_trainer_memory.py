"""benchmarks/trainer_memory.py --small: trainer ranks (1 and 2, FSDP2 over gloo) and the
log-prob pass measured in fresh processes, each beside copd-ray plan's estimate; it exits 0
only when every estimate is within 25%, every loss is finite, a rank of 2 holds half the
state and the chunked log-probs equal the full ones."""

import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow  # about 95 s on 2 cores
def test_the_small_benchmark_prints_its_table_and_passes():
    result = subprocess.run([sys.executable, "benchmarks/trainer_memory.py", "--small"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for text in ("measured peak RSS vs copd-ray plan's estimate", "plan/peak", "2 ranks vs 1 rank, per rank",
                 "state 2/1", "log-prob pass, forward + backward", "full/this", "chunked vs full: log-probs differ",
                 "ok: every estimate within 25%"):
        assert text in out, text
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert {(r[0], r[1], r[2]) for r in rows if len(r) == 12} == {
        (n, c, m) for n in ("1", "2") for c in ("off", "on") for m in ("1", "4")}
