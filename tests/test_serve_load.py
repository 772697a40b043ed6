"""The HTTP scoring API under load (benchmarks/serve_load.py), and what stops it from starting."""

import importlib.util
import socket

import pytest
import ray
import requests

from conftest import REPO, free_port
from copd_ray.actors import ScorerActor
from copd_ray.config import EngineConfig
from copd_ray.serve import ServeError

TOKEN = "load-token"

spec = importlib.util.spec_from_file_location("serve_load", REPO / "benchmarks" / "serve_load.py")
serve_load = importlib.util.module_from_spec(spec)
spec.loader.exec_module(serve_load)


def test_a_busy_port_is_one_line_before_serve_starts(ray_session):
    from ray import serve

    from copd_ray.serve import start_serving

    serve.shutdown()  # a Serve an earlier module left running keeps its own address: nothing to check then
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServeError, match=f"^127.0.0.1:{port} is already in use; pick another serve.port"):
            start_serving({}, {}, "127.0.0.1", port, TOKEN)
    assert not serve.status().proxies  # refused before Serve started


@pytest.fixture(scope="module")
def served(ray_session, tiny_folder, tiny_tokenizer):
    from ray import serve

    from copd_ray.serve import start_serving

    port = free_port()
    scorer = ScorerActor.options(num_cpus=0.1).remote("add", str(tiny_folder), "hf", EngineConfig().model_dump())
    start_serving({"add": scorer}, {"add": str(tiny_folder)}, "127.0.0.1", port, TOKEN)
    cases = serve_load.make_cases(len(tiny_tokenizer), tiny_tokenizer.bos_token_id)
    expected = [ray.get(scorer.score.remote(c["sequences"], c["prompt_lengths"])).logprobs for c in cases]
    yield {"url": f"http://127.0.0.1:{port}/score/add", "cases": cases, "expected": expected}
    serve.shutdown()
    ray.kill(scorer)


def test_16_clients_x_100_requests_all_answered_right_and_the_server_stays_up(served):
    result = serve_load.run_load(served["url"], TOKEN, served["cases"], served["expected"], clients=16, per_client=100)
    print(serve_load.report(result, 16, 100))
    assert result["requests"] == 1600 and result["errors"] == [], result["errors"][:5]
    after = requests.post(served["url"], json=served["cases"][3], headers={"Authorization": f"Bearer {TOKEN}"},
                          timeout=60)
    assert serve_load.problem(after, served["expected"][3]) is None
