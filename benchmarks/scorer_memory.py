"""Peak memory of a scorer scoring the largest request the HTTP API allows: how the default
limits of copd_ray.serve (max_request_tokens, the body cap) were sized.

    python benchmarks/scorer_memory.py [--vocab 151936] [--shapes 1x4096,256x16,16x256]

Each shape (sequences x tokens) is scored in a fresh process by the hf engine the
ScorerActor runs, on the tiny policy (its own ~40-token vocabulary) and on the same
architecture with a real-sized vocabulary (--vocab; 0 skips it). Prints the peak RSS
the call added over the loaded model, and that per padded token.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time


def measure(vocab: int, shape: tuple[int, int], queue) -> None:
    import torch

    from copd_ray.engines.hf import HFEngine
    from copd_ray.models import build_char_tokenizer, build_tiny_policy

    torch.set_num_threads(1)
    tokenizer = build_char_tokenizer()
    model = build_tiny_policy(tokenizer)
    if vocab:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    engine = HFEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    engine.score([[1, 5, 6]], [1])  # first call's one-off allocations are not the request's
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n, length = shape
    sequences = [[tokenizer.bos_token_id] + [4 + (i * 7 + j) % 30 for j in range(length - 1)] for i in range(n)]
    start = time.perf_counter()
    engine.score(sequences, [length // 2] * n)
    seconds = time.perf_counter() - start
    queue.put((before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before, seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151936, help="a real vocabulary's size (Qwen2.5); 0 skips it")
    parser.add_argument("--shapes", default="1x4096,256x16,16x256", help="sequences x tokens, comma-separated")
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]

    from copd_ray.models import build_char_tokenizer

    tiny_vocab = len(build_char_tokenizer())
    context = multiprocessing.get_context("spawn")  # a fresh process each: ru_maxrss only grows
    print(f"{'vocab':>7} {'shape':>9} {'padded':>7} {'model MB':>9} {'peak +MB':>9} {'KB/token':>9} {'seconds':>8}")
    for vocab in [0] + ([args.vocab] if args.vocab else []):
        for shape in shapes:
            queue = context.Queue()
            child = context.Process(target=measure, args=(vocab, shape, queue))
            child.start()
            before, added, seconds = queue.get()
            child.join()
            padded = shape[0] * shape[1]
            print(f"{vocab or tiny_vocab:>7} {shape[0]:>4}x{shape[1]:<4} {padded:>7} {before / 2**20:>9.0f} "
                  f"{added / 2**20:>9.0f} {added / padded / 1024:>9.1f} {seconds:>8.2f}")


if __name__ == "__main__":
    main()
