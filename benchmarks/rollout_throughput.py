"""Rollout throughput and in-place weight-update time of the pure-torch and vLLM engines,
side by side on the same model, batch shape and sampling settings.

    python benchmarks/rollout_throughput.py [--prompts 64] [--n 8] [--max-new-tokens 32] [--threads 2]
    python benchmarks/rollout_throughput.py --model FOLDER [CONFIG.yaml] ...   # a real model, the config's prompts

With --model (e.g. the SmolLM2 folder `copd-ray import-gguf` prints), the prompts are the first
capability's held-out problems of CONFIG (default configs/smollm2.yaml) through the model's
chat template, sampled at the config's grpo.temperature; otherwise the untrained tiny policy.

vLLM is optional: without it only the pure-torch engine is measured. Both engines run in
this one process, one after the other, with the same number of torch threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def measure(engine, prompts, params, repeats: int) -> dict:
    engine.generate(prompts[:4], params)  # warm-up
    times, tokens = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        samples = engine.generate(prompts, params)
        times.append(time.perf_counter() - start)
        tokens = sum(len(s.token_ids) for s in samples)
    t = statistics.median(times)
    return {"seconds": t, "tokens_per_s": tokens / t, "rollouts_per_s": len(samples) / t, "mean_len": tokens / len(samples)}


def time_update(engine, state_dict, repeats: int = 5) -> float:
    times = []
    for v in range(repeats):
        start = time.perf_counter()
        engine.update_weights(list(state_dict.items()), version=v + 1)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def real_model(args):
    """(model, tokenizer, chat prompts, temperature) of a real model folder and a config's data."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from copd_ray.capabilities import build_capability
    from copd_ray.config import load_config
    from copd_ray.data import encode_prompt

    cfg = load_config(args.config, [f"model.path={args.model}", "model.gguf=null"])
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    cap = build_capability(cfg.capabilities[0], cfg.seed)
    prompts = [encode_prompt(r, tokenizer, cap.template) for r in cap.heldout[: args.prompts]]
    return model, tokenizer, prompts, cfg.grpo.temperature


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None, help="a Hugging Face model folder instead of the tiny policy")
    parser.add_argument("config", nargs="?", default="configs/smollm2.yaml", help="with --model: whose prompts")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import torch

    from copd_ray.engines import HFEngine, SamplingParams
    from copd_ray.models import build_char_tokenizer, build_tiny_policy, save_policy

    torch.set_num_threads(args.threads)
    if args.model:
        model, tokenizer, prompts, temperature = real_model(args)
        folder, what = args.model, f"{args.model}"
    else:
        tokenizer = build_char_tokenizer()
        model = build_tiny_policy(tokenizer, seed=0).eval()
        folder = save_policy(model, tokenizer, tempfile.mkdtemp() + "/tiny")
        prompts = [tokenizer(f"{i:03d}+{(7 * i) % 1000:03d}=")["input_ids"] for i in range(args.prompts)]
        temperature, what = 1.0, "tiny Llama"
    params = SamplingParams(n=args.n, temperature=temperature, top_p=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    state = model.state_dict()
    print(f"model: {what}, {sum(p.numel() for p in model.parameters()):,} params; batch {args.prompts} prompts "
          f"x {args.n} samples, up to {args.max_new_tokens} new tokens, T={temperature}; {args.threads} threads")

    rows = {}
    hf = HFEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, max_batch_size=args.prompts * args.n)
    rows["hf (pure torch)"] = {**measure(hf, prompts, params, args.repeats), "update_s": time_update(hf, state)}
    try:
        from copd_ray.engines.vllm import VLLMEngine
    except ImportError:
        VLLMEngine = None
    if VLLMEngine is not None and __import__("importlib").util.find_spec("vllm"):
        start = time.perf_counter()
        vllm_engine = VLLMEngine(str(folder), threads=args.threads, max_num_seqs=args.prompts * args.n,
                                 max_model_len=512 if args.model else None)
        print(f"vLLM engine start: {time.perf_counter() - start:.1f} s")
        rows["vllm"] = {**measure(vllm_engine, prompts, params, args.repeats), "update_s": time_update(vllm_engine, state)}
    else:
        print("vllm is not installed: measuring the pure-torch engine only")

    print(f"{'engine':<16} {'tokens/s':>10} {'rollouts/s':>11} {'mean len':>9} {'batch s':>8} {'update ms':>10}")
    for name, r in rows.items():
        print(f"{name:<16} {r['tokens_per_s']:>10.0f} {r['rollouts_per_s']:>11.1f} {r['mean_len']:>9.1f} "
              f"{r['seconds']:>8.3f} {r['update_s'] * 1000:>10.1f}")
    if len(rows) == 2:
        hf_r, v_r = rows["hf (pure torch)"], rows["vllm"]
        print(f"vllm / hf: tokens/s x{v_r['tokens_per_s'] / hf_r['tokens_per_s']:.2f}, "
              f"weight update x{v_r['update_s'] / hf_r['update_s']:.2f} the time")


if __name__ == "__main__":
    main()
