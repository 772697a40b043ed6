"""Teacher-scoring latency of one 64 x 128-token batch through the three ways to reach a
scorer: HTTP (Ray Serve), a Serve deployment handle, and a direct actor call, side by side.

    python benchmarks/scoring_latency.py [--batch 64] [--tokens 128] [--repeats 20]

Starts a local Ray and Serve on 127.0.0.1, one ScorerActor over the tiny policy (pure-torch
engine), and prints p50/p90 in milliseconds for each path.
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import tempfile
import time


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered) * 1000, ordered[int(0.9 * (len(ordered) - 1))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    import ray
    import requests
    from ray import serve

    from copd_ray.actors import ScorerActor
    from copd_ray.config import EngineConfig
    from copd_ray.models import build_char_tokenizer, build_tiny_policy, save_policy
    from copd_ray.serve import start_serving

    tokenizer = build_char_tokenizer()
    folder = str(save_policy(build_tiny_policy(tokenizer), tokenizer, tempfile.mkdtemp() + "/tiny"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scorer = ScorerActor.options(num_cpus=0.5).remote("bench", folder, "hf", EngineConfig().model_dump(), threads=1)
    handle = start_serving({"bench": scorer}, {"bench": folder}, "127.0.0.1", port, max_sequences=args.batch,
                           max_tokens=args.tokens)["bench"]

    rng = random.Random(0)
    sequences = [[tokenizer.bos_token_id] + [rng.randrange(4, len(tokenizer)) for _ in range(args.tokens - 1)]
                 for _ in range(args.batch)]
    plens = [args.tokens // 2] * args.batch
    session = requests.Session()
    paths = {
        "http (Ray Serve)": lambda: session.post(f"http://127.0.0.1:{port}/score/bench",
                                                 json={"sequences": sequences, "prompt_lengths": plens}).json(),
        "deployment handle": lambda: handle.score.remote(sequences, plens).result(),
        "actor call": lambda: ray.get(scorer.score.remote(sequences, plens)),
    }
    results = {}
    for _ in range(3):  # warm-up, interleaved
        for call in paths.values():
            call()
    times = {name: [] for name in paths}
    for _ in range(args.repeats):  # interleaved so that load drifts hit every path alike
        for name, call in paths.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    results = {name: percentiles(t) for name, t in times.items()}
    print(f"scoring {args.batch} x {args.tokens} tokens ({args.tokens - args.tokens // 2} response tokens each), "
          f"tiny policy, pure-torch scorer, {args.repeats} interleaved repeats")
    print(f"{'path':<20} {'p50 ms':>8} {'p90 ms':>8} {'vs actor':>9}")
    base = results["actor call"][0]
    for name, (p50, p90) in results.items():
        print(f"{name:<20} {p50:>8.1f} {p90:>8.1f} {p50 / base:>8.2f}x")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
