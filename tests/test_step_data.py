"""The step's records (no Ray): packed rollouts dealt to trainer ranks, the trainer's batch
from its share (layout, counts, lag), and the step's record from every rank's tally."""

import pytest
import torch

from copd_ray.batch import TrainBatch, assemble, step_record
from copd_ray.step_data import OPDEdge, Rollouts, StepSpec, TeacherScores


def _rollouts(prompt, responses, rewards, version, policy_step):
    return Rollouts.pack([prompt + r for r in responses], [len(prompt)] * len(responses),
                         [[-0.5] * len(r) for r in responses], rewards, version, policy_step, seconds=1.0)


def test_packed_rollouts_hold_each_row_and_deal_whole_groups_to_ranks_by_tokens():
    sequences = [[1, 5], [1, 6, 6], [2, 7, 7, 7, 7], [2, 8], [3, 9], [3, 9, 9]]
    logprobs = [[-float(i)] * (len(s) - 1) for i, s in enumerate(sequences)]
    rollouts = Rollouts.pack(sequences, [1] * 6, logprobs, [1.0, 0.0, 0.5, 0.0, 1.0, 1.0], 4, 4, 2.0)
    assert rollouts.tokens.dtype == torch.int32 and rollouts.logprobs.dtype == torch.float32
    assert rollouts.sequences() == sequences and rollouts.per_row(rollouts.logprobs) == logprobs
    assert rollouts.split(1, 2) == [rollouts]
    first, second = rollouts.split(2, 2)
    # Groups of 2 rows hold 5, 7 and 5 tokens: the longest to rank 0, then each to the lighter rank.
    assert first.sequences() == sequences[2:4] and second.sequences() == sequences[:2] + sequences[4:]
    assert second.per_row(second.logprobs) == logprobs[:2] + logprobs[4:] and second.rewards.tolist() == [1.0, 0.0, 1.0, 1.0]
    assert Rollouts.concat([first, second]).sequences() == sequences[2:4] + sequences[:2] + sequences[4:]
    empty = rollouts.take([])
    assert len(empty) == 0 and empty.sequences() == [] and len(Rollouts.concat([empty, first])) == 2

    # A teacher scores every share of two generators at once and cuts its scores back per rank.
    other = rollouts.take([0, 1])
    parts = [first, second, other.take([]), other]  # generator-major: g0 r0, g0 r1, g1 r0, g1 r1
    flat = torch.cat([p.logprobs for p in parts]) * 2
    rank0, rank1 = TeacherScores(flat, 7, 0.5).cut(parts, 2)
    assert rank0.logprobs.tolist() == (first.logprobs * 2).tolist()
    assert rank1.logprobs.tolist() == torch.cat([second.logprobs, other.logprobs]).mul(2).tolist()


def test_assemble_lays_out_native_then_each_teachers_rows_and_counts_what_the_step_spent():
    native = [_rollouts([1, 2], [[5, 6], [7]], [1.0, 0.0], 3, 3), _rollouts([3], [[8], [9, 9, 9]], [0.5, 0.0], 3, 3)]
    peer = _rollouts([4, 4], [[6], [6, 6]], [0.0, 1.0], 2, 2)
    scores = TeacherScores(torch.tensor([-0.1, -0.2, -0.3]), version=7, seconds=0.5)
    spec = StepSpec(4, "opd", group_size=2, native_parts=2, edges=[OPDEdge("mul", 1)], trainer_version=3)
    batch, tally = assemble(spec, (*native, peer, scores), trainer_steps=3)

    rows = batch.rows  # the native rows, then the teacher's
    assert rows.sequences() == [[1, 2, 5, 6], [1, 2, 7], [3, 8], [3, 9, 9, 9], [4, 4, 6], [4, 4, 6, 6]]
    assert rows.prompt_lengths.tolist() == [2, 2, 1, 1, 2, 2] and batch.grpo_rows == 4
    assert rows.rewards.tolist()[:4] == [1.0, 0.0, 0.5, 0.0]
    assert batch.teacher_logprobs.tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert [len(lp) for lp in rows.per_row(rows.logprobs)] == [2, 1, 1, 3, 1, 2]
    record = step_record(spec, [tally])
    assert record["reward_mean"] == 1.5 / 4 and record["pass_rate"] == 0.25 and record["response_length"] == 7 / 4
    assert record["opd/mul/teacher_version"] == 7 and record["opd/mul/reward_mean"] == 0.5
    assert record["opd/mul/logp_gap"] == pytest.approx((-0.6 - (-1.5)) / 3, abs=1e-7)
    assert record["teacher_tokens"] == 3 and record["rollouts"] == 6 and record["opd_batches"] == 1
    # The peer's rollouts came from weights one step older than the trainer's: off-policy.
    assert record["lag/steps"] == 1 and record["lag/behaviour_version"] == 2 and batch.off_policy
    assert record["time/generate"] == 2.0 and record["time/score"] == 0.5

    on_policy, tally = assemble(StepSpec(1, "rl", 2, 2), tuple(native), trainer_steps=3)
    assert step_record(StepSpec(1, "rl", 2, 2), [tally])["lag/steps"] == 0 and not on_policy.off_policy
    other_engine, _ = assemble(StepSpec(1, "rl", 2, 2, behaviour_exact=False), tuple(native), trainer_steps=3)
    assert other_engine.off_policy  # vLLM's or bf16 numerics: weighted even at lag 0

    # Two ranks' shares (each generator's rows dealt by group): the record is the whole batch's.
    shares = [[p.split(2, 2)[r] for p in native] for r in range(2)]
    tallies = [assemble(StepSpec(1, "rl", 2, 2), tuple(share), trainer_steps=3)[1] for share in shares]
    whole = step_record(StepSpec(1, "rl", 2, 2), [assemble(StepSpec(1, "rl", 2, 2), tuple(native), 3)[1]])
    assert step_record(StepSpec(1, "rl", 2, 2), tallies) == whole



def test_a_hand_made_batch_shards_into_whole_groups_and_opd_slices():
    batch = TrainBatch.of(2, [[1, 5], [1, 6, 6], [2, 7], [2, 8]], [1] * 4, [1.0, 0.0, 0.0, 1.0],
                          [[3, 9], [3, 9, 9]], [1, 1], [[-0.1], [-0.2, -0.3]])
    shard = batch.shard(1, 2)  # the second group of GRPO rows and the second OPD row, with its scores
    assert shard.rows.sequences() == [[2, 7], [2, 8], [3, 9, 9]] and shard.grpo_rows == 2
    assert shard.teacher_logprobs.tolist() == pytest.approx([-0.2, -0.3])


def test_the_step_data_benchmark_meets_its_goals_at_a_small_scale():
    """benchmarks/step_data.py --small: a rank fetches its share only, and holds it packed."""
    import re
    import subprocess
    import sys

    from conftest import REPO

    out = subprocess.run([sys.executable, "benchmarks/step_data.py", "--small"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert float(re.search(r"largest share / \(batch / 2\): ([0-9.]+)", out.stdout)[1]) <= 1.05, out.stdout
    assert float(re.search(r"as fetched: ([0-9.]+)", out.stdout)[1]) <= 1.5, out.stdout
    assert float(re.search(r"builds it: [0-9.]+ GB = ([0-9.]+)x", out.stdout)[1]) <= 1.5, out.stdout
    assert "lists, the whole step" in out.stdout
