"""The Learner (the trainer's step without Ray): mixed precision, and the GPU check script
that drives it, run here on the CPU."""

import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from copd_ray.actors.weight_sync import bucket_plan, pack, unpack
from copd_ray.batch import TrainBatch
from copd_ray.config import GRPOConfig, TrainConfig
from copd_ray.learner import Learner

GRPO = GRPOConfig(lr=1e-5, minibatches=1, loss_agg="token_mean")


def _batch(tokenizer) -> TrainBatch:
    prompt = tokenizer("12+34=")["input_ids"]
    responses = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("46", "47", "45", "46")]
    return TrainBatch.of(group_size=4, grpo_sequences=[prompt + r for r in responses],
                         grpo_prompt_lengths=[len(prompt)] * 4, grpo_rewards=[1.0, 0.0, 0.0, 1.0])


def test_bf16_learner_keeps_float32_weights_and_serves_bf16(tiny_folder):
    learner = Learner("b", 0, 1, str(tiny_folder), GRPO, dtype="bfloat16")
    assert all(p.dtype == torch.float32 for p in learner.model.parameters())
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    stats = learner.train_step(_batch(learner.tokenizer))
    assert stats["nan_skipped"] == 0 and torch.isfinite(torch.tensor(stats["loss"]))

    # An update of ~lr = 1e-5 is far below bf16's resolution at these weights (~1e-4):
    # float32 master weights keep it; the served bf16 copy is their rounding.
    after = learner.model.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    rounded_away = [k for k in moved if torch.equal(before[k].bfloat16(), after[k].bfloat16())]
    assert moved and rounded_away

    # What the weight broadcast delivers: the plan in bf16, each bucket packed and unpacked.
    plan = bucket_plan(learner.model.state_dict(), 1 << 30, learner.compute_dtype)
    served = dict(kv for bucket, tensors in zip(plan, learner.bucket_tensors(plan))
                  for kv in unpack(pack(tensors, "cpu"), bucket))
    assert all(v.dtype == torch.bfloat16 for v in served.values() if v.is_floating_point())
    assert torch.equal(served["model.embed_tokens.weight"], after["model.embed_tokens.weight"].bfloat16())
    assert served["lm_head.weight"] is served["model.embed_tokens.weight"]  # tied weights stay one tensor


def test_bf16_and_float32_learners_take_nearly_the_same_step(tiny_folder):
    losses = {}
    for dtype in ("float32", "bfloat16"):
        learner = Learner("b", 0, 1, str(tiny_folder), GRPO, dtype=dtype)
        losses[dtype] = learner.train_step(_batch(learner.tokenizer))["loss"]
    assert abs(losses["float32"] - losses["bfloat16"]) < 0.02 * max(abs(losses["float32"]), 1e-3) + 1e-3


def test_gpu_check_script_runs_its_checks_on_the_cpu(tmp_path):
    out = tmp_path / "check.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--hidden", "64", "--layers", "2",
         "--prompts", "8", "--n", "4", "--max-new-tokens", "6", "--steps", "2", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ALL OK" in run.stdout
    import json

    runs = json.loads(out.read_text())["runs"]
    assert {(r["policy"], r["dtype"]) for r in runs} == {(p, d) for p in ("text", "vl") for d in ("float32", "bfloat16")}
    for r in runs:
        assert r["score_vs_direct_max_gap"] < (1e-4 if r["dtype"] == "float32" else 0.1)
        assert r["objective_after"] > r["objective_before"]


def _sampled_batch(learner, off_policy=False) -> TrainBatch:
    """Rollouts of the learner's own weights through the hf engine, with their log-probs."""
    import copy

    from copd_ray.engines import HFEngine, SamplingParams

    engine = HFEngine(copy.deepcopy(learner.model), learner.tokenizer.eos_token_id, learner.tokenizer.pad_token_id)
    prompt = learner.tokenizer("12+34=")["input_ids"]
    samples = engine.generate([prompt], SamplingParams(n=4, max_new_tokens=6, seed=3))
    return TrainBatch.of(4, [prompt + s.token_ids for s in samples], [len(prompt)] * 4, [1.0, 0.0, 0.0, 1.0],
                         behaviour_logprobs=[s.logprobs for s in samples], off_policy=off_policy)


def test_rollout_logprobs_stand_in_for_the_old_logprob_pass_when_they_are_the_trainers_own(tiny_folder):
    grpo = GRPO.model_copy(update={"lr": 1e-3, "minibatches": 2})
    plain = Learner("b", 0, 1, str(tiny_folder), grpo)
    reused = Learner("b", 0, 1, str(tiny_folder), grpo, train=TrainConfig(reuse_rollout_logprobs=True))
    batch = _sampled_batch(plain)
    a, b = plain.train_step(batch), reused.train_step(batch)
    assert b["entropy"] != b["entropy"] and a["entropy"] > 0  # NaN: no pass measured it
    assert abs(a["loss"] - b["loss"]) < 1e-5 and a["is/weight_mean"] == b["is/weight_mean"] == 1.0
    start = Learner("b", 0, 1, str(tiny_folder), grpo).model.state_dict()
    after_a, after_b = plain.model.state_dict(), reused.model.state_dict()
    update = max((after_a[k] - start[k]).abs().max().item() for k in after_a)
    # Two AdamW updates of ~lr each; the KV-cached decode's last bits move them by ~1% at most.
    assert max((after_a[k] - after_b[k]).abs().max().item() for k in after_a) < 0.02 * update


def test_off_policy_rollouts_are_weighted_and_the_weights_logged(tiny_folder):
    learner = Learner("b", 0, 1, str(tiny_folder), GRPO.model_copy(update={"is_cap": 1.5}))
    batch = _sampled_batch(learner, off_policy=True)
    # Behaviour log-probs 0.5 lower than the trainer's: every ratio is e^0.5 = 1.65, cut to 1.5.
    batch.rows.logprobs = batch.rows.logprobs - 0.5
    stats = learner.train_step(batch)
    assert stats["is/truncated"] == 1.0 and abs(stats["is/weight_mean"] - 1.5) < 1e-6
    batch.rows.logprobs = batch.rows.logprobs + 1.0  # now 0.5 higher
    stats = learner.train_step(batch)
    assert stats["is/truncated"] == 0.0 and abs(stats["is/weight_mean"] - math.exp(-0.5)) < 2e-3


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_one_minibatch_takes_its_old_logprobs_from_the_update_forward(tiny_folder, tau):
    """grpo.minibatches=1: no separate old-log-prob pass, and the step is the plain one written
    out here: full-vocabulary log-probs of the sampling distribution (logits / temperature),
    ratio 1, the truncated importance weight of the model's own log-probs against the
    behaviour log-probs (the engine's, at temperature 1), a token-mean loss, grad-norm clip,
    one AdamW step."""
    from copd_ray.models import load_policy

    grpo = GRPO.model_copy(update={"lr": 1e-3, "is_cap": 1.5, "temperature": tau})
    learner = Learner("b", 0, 1, str(tiny_folder), grpo)
    batch = _sampled_batch(learner, off_policy=True)
    rows = batch.rows
    rows.logprobs = torch.tensor([lp + (0.7 if i % 2 else -0.6) for row in rows.per_row(rows.logprobs)
                                  for i, lp in enumerate(row)])
    stats = learner.train_step(batch)

    model, _ = load_policy(str(tiny_folder))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    rewards = batch.rows.rewards.float()
    adv = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    total, tokens, weights, entropy = 0.0, 0, [], []
    for seq, p, a, behaviour in zip(rows.sequences(), rows.prompt_lengths.tolist(), adv, rows.per_row(rows.logprobs)):
        logits = model(input_ids=torch.tensor([seq])).logits[0, p - 1 : len(seq) - 1]
        logp = torch.log_softmax(logits / tau, -1)
        lp = logp.gather(-1, torch.tensor(seq[p:]).unsqueeze(-1)).squeeze(-1)
        own = torch.log_softmax(logits.detach(), -1).gather(-1, torch.tensor(seq[p:]).unsqueeze(-1)).squeeze(-1)
        w = torch.exp(own - torch.tensor(behaviour)).clamp(max=1.5)
        total = total - (torch.exp(lp - lp.detach()) * a * w).sum()
        tokens += len(lp)
        weights += w.tolist()
        entropy += (-(logp.exp() * logp).sum(-1)).tolist()
    (total / tokens).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()

    assert abs(stats["is/weight_mean"] - sum(weights) / len(weights)) < 1e-5
    assert stats["is/truncated"] == sum(w == 1.5 for w in weights) / len(weights) > 0
    assert abs(stats["entropy"] - sum(entropy) / len(entropy)) < 1e-4  # measured in the update's own forward
    assert abs(stats["loss"] - total.item() / tokens) < 1e-5 and stats["clip_fraction"] == 0.0
    start = load_policy(str(tiny_folder))[0].state_dict()
    mine, theirs = learner.model.state_dict(), model.state_dict()
    update = max((theirs[k] - start[k]).abs().max().item() for k in theirs)
    assert update > 1e-4
    # AdamW's first step divides each gradient by its own size, which magnifies the float
    # rounding of the smallest gradients: a few elements move by up to 2% of the update.
    gaps = torch.cat([(mine[k] - theirs[k]).abs().flatten() for k in mine])
    assert gaps.max() < 2e-2 * update and (gaps > 1e-3 * update).float().mean() < 1e-3


def test_each_prompt_read_once_gives_the_log_probs_and_gradients_of_whole_rows(tiny_folder):
    """train.share_prompts: two groups of prompts of different lengths (and a row with no
    response) give, through one prompt pass and the responses on its KV cache, the log-probs
    and gradients that each row read whole by itself gives."""
    from copd_ray.step_data import Rollouts

    learner = Learner("b", 0, 1, str(tiny_folder), GRPO)
    tok = learner.tokenizer
    prompts = [tok(p)["input_ids"] for p in ("12+345=", "7*8=")]
    responses = [tok(t, add_special_tokens=False)["input_ids"] for t in ("357", "3", "35", "56", "5", "")]
    sequences = [prompts[i // 3] + r for i, r in enumerate(responses)]
    plens = [len(prompts[i // 3]) for i in range(6)]
    rows = Rollouts.pack(sequences, plens, [[0.0] * (len(q) - p) for q, p in zip(sequences, plens)], [0.0] * 6, 0, 0, 0)
    mb = learner.microbatch(learner.step_rows(TrainBatch(rows)), list(range(6)))
    assert mb.shared is not None and mb.shared.prompt_ids.shape[0] == 2  # two prompt passes for six rows

    learner.model.zero_grad()
    lp, ent, _ = learner.logprobs(mb, entropy=True)
    lp.sum().backward()
    shared_grads = {k: p.grad.clone() for k, p in learner.model.named_parameters()}

    learner.model.zero_grad()
    total = 0.0
    for seq, p, row, row_ent in zip(sequences, plens, lp, ent):
        logp = torch.log_softmax(learner.model(input_ids=torch.tensor([seq])).logits[0, p - 1 : len(seq) - 1], -1)
        direct = logp.gather(-1, torch.tensor(seq[p:], dtype=torch.long).unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(row[p - 1 : len(seq) - 1], direct, atol=1e-5)
        assert torch.allclose(row_ent[p - 1 : len(seq) - 1], -(logp.exp() * logp).sum(-1), atol=1e-5)
        assert row[len(seq) - 1 :].abs().sum() == 0 and row[: p - 1].abs().sum() == 0  # nothing off the response
        total = total + direct.sum()
    total.backward()
    for k, p in learner.model.named_parameters():
        assert torch.allclose(shared_grads[k], p.grad, atol=1e-5, rtol=1e-4), k
    assert any(g.abs().sum() > 0 for g in shared_grads.values())


def test_a_step_on_shared_prompts_is_the_step_on_whole_rows(tiny_folder):
    grpo = GRPO.model_copy(update={"lr": 1e-3, "minibatches": 2, "loss_agg": "seq_mean_token_mean"})
    shared = Learner("b", 0, 1, str(tiny_folder), grpo)
    whole = Learner("b", 0, 1, str(tiny_folder), grpo, train=TrainConfig(share_prompts=False))
    batch = _sampled_batch(shared)
    a, b = shared.train_step(batch), whole.train_step(batch)
    for key in ("loss", "entropy", "clip_fraction"):
        assert abs(a[key] - b[key]) < 1e-5, key
    start = Learner("b", 0, 1, str(tiny_folder), grpo).model.state_dict()
    after_a, after_b = shared.model.state_dict(), whole.model.state_dict()
    update = max((after_b[k] - start[k]).abs().max().item() for k in after_b)
    # Two AdamW updates: each divides a gradient by its own size, magnifying float rounding.
    assert max((after_a[k] - after_b[k]).abs().max().item() for k in after_a) < 0.02 * update


def test_tempered_rows_are_read_once_or_whole_alike_and_opd_rows_stay_at_temperature_one(tiny_folder):
    """Per-row temperatures through the shared-prompt path equal logits / T of each row read
    whole; a row at temperature 1 gives the model's own log-probs; `own` is always those."""
    from copd_ray.step_data import Rollouts

    learner = Learner("b", 0, 1, str(tiny_folder), GRPO)
    tok = learner.tokenizer
    prompt = tok("12+345=")["input_ids"]
    sequences = [prompt + tok(t, add_special_tokens=False)["input_ids"] for t in ("357", "35", "3")]
    plens = [len(prompt)] * 3
    temps = torch.tensor([0.5, 1.0, 2.0])
    rows = Rollouts.pack(sequences, plens, [[0.0] * (len(q) - p) for q, p in zip(sequences, plens)], [0.0] * 3, 0, 0, 0)
    mb = learner.microbatch(learner.step_rows(TrainBatch(rows)), [0, 1, 2])
    mb.temperature = temps
    with torch.no_grad():
        lp, ent, own = learner.logprobs(mb, entropy=True, own=True)
        for seq, row, row_ent, row_own, t in zip(sequences, lp, ent, own, temps):
            p = len(prompt)
            logits = learner.model(input_ids=torch.tensor([seq])).logits[0, p - 1 : len(seq) - 1]
            target = torch.tensor(seq[p:]).unsqueeze(-1)
            logp = torch.log_softmax(logits / t, -1)
            assert torch.allclose(row[p - 1 : len(seq) - 1], logp.gather(-1, target).squeeze(-1), atol=1e-5)
            assert torch.allclose(row_ent[p - 1 : len(seq) - 1], -(logp.exp() * logp).sum(-1), atol=1e-5)
            plain = torch.log_softmax(logits, -1).gather(-1, target).squeeze(-1)
            assert torch.allclose(row_own[p - 1 : len(seq) - 1], plain, atol=1e-5)
    assert not torch.allclose(lp[0], own[0]) and torch.allclose(lp[1], own[1])


def test_the_branchs_opd_beta_scales_its_opd_advantages(tiny_folder):
    """The Learner takes its branch's beta (branches[].beta, else opd.beta) at construction:
    OPD rows' loss is linear in it (ratio 1 on the first step), and beta 0 moves nothing."""
    from copd_ray.config import load_config

    cfg = load_config(None, ["opd.beta=0.5", "branches=[{name: add, beta: 2.0}, {name: mul}]"])
    assert cfg.opd_beta("add") == 2.0 and cfg.opd_beta("mul") == 0.5
    tok = Learner("b", 0, 1, str(tiny_folder), GRPO).tokenizer
    prompt = tok("12+34=")["input_ids"]
    rows = [prompt + tok(t, add_special_tokens=False)["input_ids"] for t in ("46", "47")]
    batch = TrainBatch.of(2, [], [], [], rows, [len(prompt)] * 2, [[-0.5, -0.1], [-3.0, -2.0]])
    losses = {beta: Learner("b", 0, 1, str(tiny_folder), GRPO, beta=beta).train_step(batch)["loss"] for beta in (1.0, 2.0)}
    assert losses[2.0] == pytest.approx(2 * losses[1.0], rel=1e-5) and losses[1.0] != 0
    still = Learner("b", 0, 1, str(tiny_folder), GRPO, beta=0.0)
    before = {k: v.clone() for k, v in still.model.state_dict().items()}
    assert still.train_step(batch)["loss"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in still.model.state_dict().items())


def test_the_steps_three_parts_against_plain_computations(tiny_folder):
    """old_logprobs, advantages and update, each checked alone: the old log-probs and entropy
    of a no-gradient pass are each row's plain full-vocabulary ones; GRPO's advantage is its
    group's (r - mean) / (std + 1e-6) on every response token; an OPD token's is beta *
    (teacher - old); and an update whose advantages are all zero moves no weight."""
    learner = Learner("b", 0, 1, str(tiny_folder), GRPO.model_copy(update={"minibatches": 2}), beta=0.5)
    tok = learner.tokenizer
    prompts = [tok(p)["input_ids"] for p in ("12+34=", "5*6=")]
    answers = [tok(a, add_special_tokens=False)["input_ids"] for a in ("46", "4", "30", "31", "3", "11")]
    rows = [prompts[min(i // 2, 1)] + a for i, a in enumerate(answers)]
    plens = [len(prompts[min(i // 2, 1)]) for i in range(6)]
    teacher = [[-0.5] * len(answers[4]), [-1.0, -2.0][: len(answers[5])]]
    batch = TrainBatch.of(2, rows[:4], plens[:4], [1.0, 0.0, 0.0, 0.5], rows[4:], plens[4:], teacher)

    step = learner.step_rows(batch)
    old = learner.old_logprobs(step)
    entropy = 0.0
    with torch.no_grad():
        for i, (seq, p) in enumerate(zip(rows, plens)):
            logp = torch.log_softmax(learner.model(input_ids=torch.tensor([seq])).logits[0, p - 1 : len(seq) - 1], -1)
            direct = logp.gather(-1, torch.tensor(seq[p:]).unsqueeze(-1)).squeeze(-1)
            assert torch.allclose(old.logprobs[i, p - 1 : len(seq) - 1], direct, atol=1e-5)
            assert old.logprobs[i].abs().sum() == pytest.approx(direct.abs().sum().item(), abs=1e-4)  # nothing else
            entropy += -(logp.exp() * logp).sum().item()
    assert old.entropy.item() == pytest.approx(entropy, rel=1e-5)

    adv = learner.advantages(step)
    for group, rewards in enumerate(([1.0, 0.0], [0.0, 0.5])):
        mean, std = sum(rewards) / 2, math.sqrt(sum((r - sum(rewards) / 2) ** 2 for r in rewards))  # n - 1 = 1
        for j, r in enumerate(rewards):
            i = 2 * group + j
            expected = torch.zeros(step.mask.shape[1])
            expected[plens[i] - 1 : len(rows[i]) - 1] = (r - mean) / (std + 1e-6)
            assert torch.allclose(adv.grpo[i], expected, atol=1e-5)
    mb = learner.microbatch(step, list(range(6)))
    signal = adv.of(mb, old.logprobs, mb.mask)
    for i, values in zip((4, 5), teacher):
        span = slice(plens[i] - 1, len(rows[i]) - 1)
        assert torch.allclose(signal[i, span], 0.5 * (torch.tensor(values) - old.logprobs[i, span]), atol=1e-6)
    assert torch.equal(signal[:4], adv.grpo[:4])

    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    still = learner.update(step, old, type(adv)(torch.zeros_like(adv.grpo), old.logprobs.clone(), adv.opd, 0.5))
    assert still["loss"] == 0.0 and still["sequences"] == 6 and still["nan_skipped"] == 0
    assert all(torch.equal(before[k], v) for k, v in learner.model.state_dict().items())
