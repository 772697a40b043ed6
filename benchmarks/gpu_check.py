"""The GPU paths, checked and timed on one device: the pure-torch engine (generation,
teacher-forced scoring, both against a direct forward) and the Learner's training step
(GRPO and OPD rows in one batch), for the text policy and the vision-language one, in
float32 and bfloat16 side by side.

    python benchmarks/gpu_check.py [--device cuda] [--hidden 512] [--layers 8] [--out gpu_check.json]

No Ray, no cluster: the Learner is the TrainerActor's step without the actor. On CPU it
runs too (slowly), which is how it is tested before it meets a GPU.
The Learner takes its typed settings (`GRPOConfig`), so pydantic must be importable
there: the device image lacks it; carry its wheels unpacked, as Ray's (see GPU_NOTES).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time

import torch

from copd_ray.config import GRPOConfig

GRPO = GRPOConfig(lr=1e-5, minibatches=2, loss_agg="token_mean")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _direct_logprobs(model, sequence, prompt_length: int, banned) -> list[float]:
    """Log-probs of one unpadded sequence's response tokens from a plain forward."""
    from copd_ray.models.vl_inputs import VisualInputs, ban_tokens

    device = next(model.parameters()).device
    if isinstance(sequence, VisualInputs):
        kwargs, ids = sequence.model_kwargs(device), sequence.input_ids
    else:
        kwargs, ids = {"input_ids": torch.tensor([sequence], device=device)}, list(sequence)
    with torch.no_grad():
        logp = torch.log_softmax(ban_tokens(model(**kwargs).logits[0].float(), banned), dim=-1)
    return [logp[t - 1, ids[t]].item() for t in range(prompt_length, len(ids))]


def _max_gap(rows_a, rows_b) -> float:
    return max(abs(a - b) for ra, rb in zip(rows_a, rows_b) for a, b in zip(ra, rb))


def check(folder: str, prompts: list, dtype: str, device: str, n: int, max_new_tokens: int, steps: int) -> dict:
    """Engine and learner on one policy folder in one dtype."""
    from copd_ray.algo import grpo_advantages
    from copd_ray.batch import TrainBatch
    from copd_ray.engines import HFEngine, SamplingParams
    from copd_ray.learner import Learner
    from copd_ray.models import load_policy

    torch.manual_seed(0)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    model, tokenizer = load_policy(folder, dtype, device=device)
    engine = HFEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    params = SamplingParams(n=n, temperature=1.0, max_new_tokens=max_new_tokens, seed=0)
    engine.generate(prompts, params)  # warm-up at the timed shapes (kernel choice, allocator)
    _sync(device)
    start = time.perf_counter()
    samples = engine.generate(prompts, params)
    _sync(device)
    gen_s = time.perf_counter() - start
    tokens = sum(len(s.token_ids) for s in samples)

    sequences = [prompts[s.prompt_index] + s.token_ids for s in samples]
    plens = [len(prompts[s.prompt_index]) for s in samples]
    engine.score(sequences, plens)  # warm-up
    _sync(device)
    start = time.perf_counter()
    scores = engine.score(sequences, plens)
    _sync(device)
    score_s = time.perf_counter() - start
    probe = range(0, len(samples), max(1, len(samples) // 8))  # a few sequences, each unpadded
    direct = [_direct_logprobs(model, sequences[i], plens[i], engine.banned) for i in probe]
    result = {
        "dtype": dtype, "rollouts": len(samples), "tokens": tokens,
        "generate_tokens_per_s": round(tokens / gen_s, 1), "score_tokens_per_s": round(tokens / score_s, 1),
        # Sampling and scoring must see one distribution; bf16 differs by rounding only.
        "sample_vs_score_max_gap": _max_gap([s.logprobs for s in samples], scores.logprobs),
        "score_vs_direct_max_gap": _max_gap([scores.logprobs[i] for i in probe], direct),
    }
    del engine, model

    # The learner's step on these rollouts: half the groups as GRPO rows (rewarded when the
    # response holds an even digit, a rule any policy can be pushed towards), half as OPD rows
    # whose "teacher" is the sampling policy itself shifted by +1 nat on even digits.
    learner = Learner("gpu-check", 0, 1, folder, GRPO, dtype, device=device)
    even = {tokenizer.convert_tokens_to_ids(c) for c in "02468"}
    half = (len(samples) // n // 2) * n
    grpo_rows, opd_rows = range(half), range(half, len(samples))
    rewards = [float(any(t in even for t in samples[i].token_ids)) for i in grpo_rows]
    teacher = [[lp + (1.0 if t in even else 0.0) for t, lp in zip(samples[i].token_ids, scores.logprobs[i])]
               for i in opd_rows]
    batch = TrainBatch.of(
        group_size=n,
        grpo_sequences=[sequences[i] for i in grpo_rows], grpo_prompt_lengths=[plens[i] for i in grpo_rows],
        grpo_rewards=rewards,
        opd_sequences=[sequences[i] for i in opd_rows], opd_prompt_lengths=[plens[i] for i in opd_rows],
        opd_teacher_logprobs=teacher,
    )
    # What the step ascends, with the advantages held at their start: GRPO's sequence
    # advantage on every response token, OPD's teacher-minus-student log-prob per token.
    # A step that works raises it; a summed log-prob of the rewarded responses alone need
    # not rise (mass also leaves the tokens the unrewarded responses share with them).
    seq_adv = grpo_advantages(torch.tensor(rewards), n).tolist()
    probe_rows = [*grpo_rows[:32], *opd_rows[:32]]
    advantage = {i: [seq_adv[i]] * len(samples[i].token_ids) for i in grpo_rows[:32]}
    advantage.update({i: [t - s for t, s in zip(teacher[i - half], scores.logprobs[i])]
                      for i in opd_rows[:32]})

    def objective() -> float:
        learner.model.eval()
        with learner.autocast():
            rows = {i: _direct_logprobs(learner.model, sequences[i], plens[i], learner.banned) for i in probe_rows}
        learner.model.train()
        return sum(a * lp for i in probe_rows for a, lp in zip(advantage[i], rows[i])) / sum(map(len, rows.values()))

    before = objective()
    stats, times = [], []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        stats.append(learner.train_step(batch))
        _sync(device)
        times.append(time.perf_counter() - start)
    after = objective()
    result.update({
        "train_rows": len(batch), "train_step_s": round(sorted(times)[len(times) // 2], 4),
        "losses": [round(s["loss"], 5) for s in stats], "grad_norms": [round(s["grad_norm"], 4) for s in stats],
        "nan_skipped": sum(s["nan_skipped"] for s in stats),
        "objective_before": round(before, 5), "objective_after": round(after, 5),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.startswith("cuda") else None,
    })
    result["ok"] = (all(map(torch.isfinite, map(torch.tensor, result["losses"] + result["grad_norms"])))
                    and result["nan_skipped"] == 0 and after > before)
    return result


def build(kind: str, hidden: int, layers: int, root: str, prompts: int):
    """A tiny policy folder and its prompts: add problems as token ids, or counting images
    (with a few motion videos) as VisualInputs."""
    from copd_ray.models.tiny import build_char_tokenizer, build_tiny_policy, save_policy

    rng = random.Random(0)
    if kind == "text":
        tokenizer = build_char_tokenizer()
        model = build_tiny_policy(tokenizer, hidden, layers, hidden // 32, 4 * hidden, seed=0)
        folder = save_policy(model, tokenizer, f"{root}/text")
        return str(folder), [tokenizer(f"{rng.randint(0, 999):03d}+{rng.randint(0, 999):03d}=")["input_ids"]
                             for _ in range(prompts)]
    from copd_ray.data.visual_tasks import count_problem, motion_problem
    from copd_ray.models.tiny_vl import build_image_processor, build_tiny_vl_policy, build_vl_tokenizer, save_vl_policy
    from copd_ray.models.vl_inputs import VisionInputBuilder

    tokenizer, processor = build_vl_tokenizer(), build_image_processor()
    model = build_tiny_vl_policy(tokenizer, hidden, layers, hidden // 32, 4 * hidden, seed=0)
    folder = save_vl_policy(model, tokenizer, processor, f"{root}/vl")
    builder = VisionInputBuilder(tokenizer, processor, model.config)
    out = []
    for i in range(prompts):
        p = motion_problem(rng) if i % 4 == 3 else count_problem(rng)
        out.append(builder.build(tokenizer(p["prompt"])["input_ids"], p.get("images", []), p.get("videos", [])))
    return str(folder), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "device": args.device,
           "name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    print(json.dumps(env))
    results = {"env": env, "args": vars(args), "runs": []}
    root = tempfile.mkdtemp(prefix="gpu-check-")
    for kind in ("text", "vl"):
        folder, prompts = build(kind, args.hidden, args.layers, root, args.prompts)
        for dtype in args.dtypes.split(","):
            try:
                run = {"policy": kind, **check(folder, prompts, dtype, args.device, args.n, args.max_new_tokens, args.steps)}
            except Exception as e:  # report and go on: one failing path must not hide the others
                run = {"policy": kind, "dtype": dtype, "ok": False, "error": f"{type(e).__name__}: {e}"}
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
    by = {(r["policy"], r["dtype"]): r for r in results["runs"]}
    for kind in ("text", "vl"):
        a, b = by.get((kind, "float32"), {}), by.get((kind, "bfloat16"), {})
        if "generate_tokens_per_s" in a and "generate_tokens_per_s" in b:
            print(f"{kind}: bf16/fp32 generate {b['generate_tokens_per_s'] / a['generate_tokens_per_s']:.2f}x, "
                  f"score {b['score_tokens_per_s'] / a['score_tokens_per_s']:.2f}x, "
                  f"train step {a['train_step_s'] / b['train_step_s']:.2f}x")
    print("ALL OK" if all(r["ok"] for r in results["runs"]) else "SOME CHECK FAILED")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
