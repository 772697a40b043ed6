"""The trainer's batch from the step's records (no Ray): layout, counts, lag."""

from copd_ray.batch import assemble
from copd_ray.step_data import OPDEdge, Rollouts, StepSpec, TeacherScores


def _rollouts(prompt, responses, rewards, version, policy_step):
    return Rollouts([prompt + r for r in responses], [len(prompt)] * len(responses),
                    [[-0.5] * len(r) for r in responses], rewards, version, policy_step, seconds=1.0)


def test_assemble_lays_out_native_then_each_teachers_rows_and_counts_what_the_step_spent():
    native = [_rollouts([1, 2], [[5, 6], [7]], [1.0, 0.0], 3, 3), _rollouts([3], [[8], [9, 9, 9]], [0.5, 0.0], 3, 3)]
    peer = _rollouts([4, 4], [[6], [6, 6]], [0.0, 1.0], 2, 2)
    scores = TeacherScores([[-0.1], [-0.2, -0.3]], version=7, seconds=0.5)
    spec = StepSpec(4, "opd", group_size=2, native_parts=2, edges=[OPDEdge("mul", 1, 0.5)], trainer_version=3)
    batch, record = assemble(spec, (*native, peer, scores), trainer_steps=3)

    assert batch.grpo_sequences == [[1, 2, 5, 6], [1, 2, 7], [3, 8], [3, 9, 9, 9]]
    assert batch.grpo_prompt_lengths == [2, 2, 1, 1] and batch.grpo_rewards == [1.0, 0.0, 0.5, 0.0]
    assert batch.opd_sequences == [[4, 4, 6], [4, 4, 6, 6]] and batch.opd_teacher_logprobs == scores.logprobs
    assert batch.opd_beta == [0.5, 0.5]
    assert [len(lp) for lp in batch.behaviour_logprobs] == [2, 1, 1, 3, 1, 2]
    assert record["reward_mean"] == 1.5 / 4 and record["pass_rate"] == 0.25 and record["response_length"] == 7 / 4
    assert record["opd/mul/teacher_version"] == 7 and record["opd/mul/reward_mean"] == 0.5
    assert record["opd/mul/logp_gap"] == (-0.6 - (-1.5)) / 3
    assert record["teacher_tokens"] == 3 and record["rollouts"] == 6 and record["opd_batches"] == 1
    # The peer's rollouts came from weights one step older than the trainer's: off-policy.
    assert record["lag/steps"] == 1 and record["lag/behaviour_version"] == 2 and batch.off_policy
    assert record["time/generate"] == 2.0 and record["time/score"] == 0.5

    on_policy, record = assemble(StepSpec(1, "rl", 2, 2), tuple(native), trainer_steps=3)
    assert record["lag/steps"] == 0 and not on_policy.off_policy
    other_engine, _ = assemble(StepSpec(1, "rl", 2, 2, behaviour_exact=False), tuple(native), trainer_steps=3)
    assert other_engine.off_policy  # vLLM's or bf16 numerics: weighted even at lag 0

    shard = batch.shard(1, 2)  # the second group of GRPO rows and the second OPD row, with their log-probs
    assert shard.grpo_sequences == batch.grpo_sequences[2:] and shard.opd_sequences == batch.opd_sequences[1:]
    assert shard.behaviour_logprobs == batch.behaviour_logprobs[2:4] + batch.behaviour_logprobs[5:]
