"""The Learner (the trainer's step without Ray): mixed precision, and the GPU check script
that drives it, run here on the CPU."""

import subprocess
import sys

import torch

from conftest import REPO
from copd_ray.actors.weight_sync import bucket_plan, pack, unpack
from copd_ray.batch import TrainBatch
from copd_ray.learner import Learner

GRPO = {"lr": 1e-5, "weight_decay": 0.0, "kl_coef": 0.0, "minibatches": 1, "clip_low": 0.2, "clip_high": 0.28,
        "loss_agg": "token_mean", "grad_clip": 1.0}


def _batch(tokenizer) -> TrainBatch:
    prompt = tokenizer("12+34=")["input_ids"]
    responses = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("46", "47", "45", "46")]
    return TrainBatch(group_size=4, grpo_sequences=[prompt + r for r in responses],
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
