"""Load test of the HTTP scoring API: concurrent clients sending valid requests.

    python benchmarks/serve_load.py [--clients 16] [--requests 100]

Starts a local Ray and Serve on 127.0.0.1 with one ScorerActor over the tiny policy, then
each client (a thread with its own connection) sends its requests one after another. The
requests differ, and every answer must be a 200 whose log-probs are the actor's for that
very request, so a failed or mixed-up answer counts as an error. Prints the errors, p50 and
p99 latency and throughput, then checks that the server still answers correctly.
tests/test_serve_load.py runs `run_load` against its own server.
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

TOKEN = "load-token"
TOLERANCE = 1e-5


def make_cases(vocab_size: int, bos: int, count: int = 8, seed: int = 0) -> list[dict]:
    """`count` different valid request bodies: 1-4 sequences of 8-32 tokens each."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        lengths = [rng.randint(8, 32) for _ in range(rng.randint(1, 4))]
        sequences = [[bos] + [rng.randrange(4, vocab_size) for _ in range(n - 1)] for n in lengths]
        cases.append({"sequences": sequences, "prompt_lengths": [rng.randint(1, n - 1) for n in lengths]})
    return cases


def problem(response, expected: list[list[float]]) -> str | None:
    """What is wrong with an answer, or None for a 200 with the expected log-probs."""
    if response.status_code != 200:
        return f"status {response.status_code}: {response.text[:200]}"
    got = response.json()["logprobs"]
    if [len(r) for r in got] != [len(r) for r in expected]:
        return f"log-probs of shape {[len(r) for r in got]}, expected {[len(r) for r in expected]}"
    worst = max(abs(a - b) for row, ref in zip(got, expected) for a, b in zip(row, ref))
    return f"log-probs off by {worst:.2e}" if worst > TOLERANCE else None


def run_load(url: str, token: str, cases: list[dict], expected: list[list[list[float]]], clients: int = 16,
             per_client: int = 100) -> dict:
    """Send clients x per_client requests to POST `url`, cycling through `cases` (whose
    answers must be `expected`); return the errors, latency percentiles and throughput."""
    import requests

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with requests.Session() as session:
            session.headers["Authorization"] = f"Bearer {token}"
            for j in range(per_client):
                case = (index + j) % len(cases)
                start = time.perf_counter()
                try:
                    response = session.post(url, json=cases[case], timeout=120)
                except requests.RequestException as e:
                    wrong = f"{type(e).__name__}: {e}"
                else:
                    wrong = problem(response, expected[case])
                seconds = time.perf_counter() - start
                with lock:
                    latencies.append(seconds)
                    if wrong:
                        errors.append(f"client {index}, request {j}: {wrong}")

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {"requests": len(ordered), "errors": errors, "p50_ms": statistics.median(ordered) * 1000,
            "p99_ms": ordered[int(0.99 * (len(ordered) - 1))] * 1000, "seconds": wall,
            "per_second": len(ordered) / wall}


def report(result: dict, clients: int, per_client: int) -> str:
    return (f"{clients} clients x {per_client} requests: {result['requests']} answered, "
            f"{len(result['errors'])} errors; "
            f"latency p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms; "
            f"{result['per_second']:.0f} requests/s over {result['seconds']:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=100, help="per client")
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
    start_serving({"bench": scorer}, {"bench": folder}, "127.0.0.1", port, TOKEN)
    cases = make_cases(len(tokenizer), tokenizer.bos_token_id)
    expected = [ray.get(scorer.score.remote(c["sequences"], c["prompt_lengths"])).logprobs for c in cases]
    url = f"http://127.0.0.1:{port}/score/bench"

    result = run_load(url, TOKEN, cases, expected, args.clients, args.requests)
    print(f"tiny policy, pure-torch scorer, 1-4 sequences of 8-32 tokens a request; "
          f"{report(result, args.clients, args.requests)}")
    for error in result["errors"][:10]:
        print(f"  {error}")
    after = problem(requests.post(url, json=cases[0], headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60),
                    expected[0])
    print(f"afterwards: {after or 'the server still answers 200 with the right log-probs'}")
    serve.shutdown()
    ray.shutdown()
    if result["errors"] or after:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
