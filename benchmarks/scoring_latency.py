"""Teacher-scoring latency of one 64 x 128-token batch through the three ways to reach a
scorer: HTTP (Ray Serve), a Serve deployment handle, and a direct actor call, side by side.

    python benchmarks/scoring_latency.py [--batch 64] [--tokens 128] [--repeats 20]

Starts a local Ray and Serve on 127.0.0.1, one ScorerActor over the tiny policy (pure-torch
engine), and prints p50/p90 in milliseconds for each path. Every answer, warm-up and timed
alike, must be a 200 whose log-probs equal the actor's (within 1e-5): a benchmark that
times error responses measures nothing, so any other answer stops it.
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import tempfile
import time

TOKEN = "benchmark-token"
TOLERANCE = 1e-5


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered) * 1000, ordered[int(0.9 * (len(ordered) - 1))] * 1000


def check(path: str, logprobs: list[list[float]], expected: list[list[float]]) -> None:
    """Stop unless `logprobs` are the expected ones, row by row, within TOLERANCE."""
    shape, want = [len(row) for row in logprobs], [len(row) for row in expected]
    if shape != want:
        raise SystemExit(f"{path}: log-probs of shape {shape}, expected {want}")
    worst = max(abs(a - b) for row, ref in zip(logprobs, expected) for a, b in zip(row, ref))
    if worst > TOLERANCE:
        raise SystemExit(f"{path}: log-probs differ from the actor's by {worst:.2e} (tolerance {TOLERANCE})")


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
    handle = start_serving({"bench": scorer}, {"bench": folder}, "127.0.0.1", port, TOKEN, max_sequences=args.batch,
                           max_tokens=args.tokens, max_request_tokens=args.batch * args.tokens)["bench"]

    rng = random.Random(0)
    sequences = [[tokenizer.bos_token_id] + [rng.randrange(4, len(tokenizer)) for _ in range(args.tokens - 1)]
                 for _ in range(args.batch)]
    plens = [args.tokens // 2] * args.batch
    expected = ray.get(scorer.score.remote(sequences, plens)).logprobs
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {TOKEN}"

    def http():
        response = session.post(f"http://127.0.0.1:{port}/score/bench",
                                json={"sequences": sequences, "prompt_lengths": plens}, timeout=120)
        return response.status_code, response.json() if response.status_code == 200 else response.text

    def http_logprobs(answer) -> list[list[float]]:
        status, body = answer
        if status != 200:
            raise SystemExit(f"http (Ray Serve): status {status}, {str(body)[:300]}")
        return body["logprobs"]

    # name: (the call that is timed, how to read log-probs from its answer, outside the timing)
    paths = {
        "http (Ray Serve)": (http, http_logprobs),
        "deployment handle": (lambda: handle.score.remote(sequences, plens).result(), lambda s: s.logprobs),
        "actor call": (lambda: ray.get(scorer.score.remote(sequences, plens)), lambda s: s.logprobs),
    }
    for _ in range(3):  # warm-up, interleaved; the first answers are checked before anything is timed
        for name, (call, logprobs) in paths.items():
            check(name, logprobs(call()), expected)
    times = {name: [] for name in paths}
    for _ in range(args.repeats):  # interleaved so that load drifts hit every path alike
        for name, (call, logprobs) in paths.items():
            start = time.perf_counter()
            answer = call()
            times[name].append(time.perf_counter() - start)
            check(name, logprobs(answer), expected)
    results = {name: percentiles(t) for name, t in times.items()}
    print(f"scoring {args.batch} x {args.tokens} tokens ({args.tokens - args.tokens // 2} response tokens each), "
          f"tiny policy, pure-torch scorer, {args.repeats} interleaved repeats; every answer a 200 equal to the "
          f"actor's within {TOLERANCE}")
    print(f"{'path':<20} {'p50 ms':>8} {'p90 ms':>8} {'vs actor':>9}")
    base = results["actor call"][0]
    for name, (p50, p90) in results.items():
        print(f"{name:<20} {p50:>8.1f} {p90:>8.1f} {p50 / base:>8.2f}x")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
