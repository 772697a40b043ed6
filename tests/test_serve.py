"""Live teacher scoring through Ray Serve: real HTTP on 127.0.0.1, real deployments."""

import json

import pytest
import ray
import requests
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from conftest import SMALL_ACTORS, SMALL_STEPS, free_port, sigint_reaches_child
from copd_ray.actors import ScorerActor
from copd_ray.config import EngineConfig
from copd_ray.serve import ServeError

TOKEN = "s3cret-token"
BODY_CAP = 16_384


@pytest.fixture(scope="module")
def served(ray_session, tiny_folder):
    from ray import serve

    from copd_ray.serve import start_serving

    port = free_port()
    scorer = ScorerActor.options(num_cpus=0.1).remote("add", str(tiny_folder), "hf", EngineConfig().model_dump())
    handles = start_serving({"add": scorer}, {"add": str(tiny_folder)}, "127.0.0.1", port, TOKEN, max_sequences=8,
                            max_tokens=64, max_request_tokens=256, max_body_bytes=BODY_CAP, body_timeout_s=2)
    yield {"url": f"http://127.0.0.1:{port}", "scorer": scorer, "handle": handles["add"]}
    serve.shutdown()
    ray.kill(scorer)


def _post(served, body, branch="add", token=TOKEN, raw=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if raw is not None:
        return requests.post(f"{served['url']}/score/{branch}", data=raw, headers=headers, timeout=60)
    return requests.post(f"{served['url']}/score/{branch}", json=body, headers=headers, timeout=60)


SEQS = [[1, 5, 6, 7, 14, 4, 8, 9, 16, 5, 7, 12, 2], [1, 12, 21, 13, 16, 9, 9, 2]]
PLENS = [9, 6]


def test_http_handle_and_actor_agree_with_a_forward_pass(served, tiny_folder):
    http = _post(served, {"sequences": SEQS, "prompt_lengths": PLENS, "top_k": 3})
    assert http.status_code == 200, http.text
    body = http.json()
    assert body["branch"] == "add" and body["version"] == 0
    handle = served["handle"].score.remote(SEQS, PLENS).result()
    actor = ray.get(served["scorer"].score.remote(SEQS, PLENS))
    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    for i, (seq, p) in enumerate(zip(SEQS, PLENS)):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0], dim=-1)
        direct = [logp[t - 1, seq[t]].item() for t in range(p, len(seq))]
        for got in (body["logprobs"][i], handle.logprobs[i], actor.logprobs[i]):
            assert got == pytest.approx(direct, abs=1e-4)
        assert body["top_k_ids"][i] == [logp[t - 1].topk(3).indices.tolist() for t in range(p, len(seq))]


def test_http_scoring_is_answered_while_a_training_call_holds_the_scorer(served, tmp_path):
    """Live HTTP scoring runs on the scorer's own "http" thread: while a training call keeps
    the scorer's main thread busy (score_rollouts again and again, until told to stop), a
    request gets its 200 with the scorer's numbers, long before that call ends."""
    import time

    from copd_ray.step_data import Rollouts

    def hold(actor, flag: str, rows) -> dict:
        import os
        import time

        calls, deadline = 0, time.time() + 120
        while not os.path.exists(flag) and time.time() < deadline:
            actor.score_rollouts(1, rows)
            calls += 1
        return {"calls": calls, "ended": time.time()}

    rows = Rollouts.pack(SEQS, PLENS, [[0.0] * (len(q) - p) for q, p in zip(SEQS, PLENS)], [0.0, 0.0], 0, 0, 0.0)
    flag, scorer = tmp_path / "release", served["scorer"]
    before = ray.get(scorer.info.remote())["score_calls"]
    held = scorer.__ray_call__.remote(hold, str(flag), rows)
    deadline = time.time() + 60
    while ray.get(scorer.info.remote())["score_calls"] == before:  # info answers on the http thread too
        assert time.time() < deadline, "the training call never started"
        time.sleep(0.05)
    http = _post(served, {"sequences": SEQS, "prompt_lengths": PLENS})
    answered = time.time()
    assert ray.wait([held], timeout=0)[0] == []  # the training call is still running
    flag.touch()
    done = ray.get(held, timeout=60)
    assert http.status_code == 200, http.text
    assert done["calls"] > 0 and answered < done["ended"]
    direct = ray.get(scorer.score.remote(SEQS, PLENS)).logprobs
    for got, expected in zip(http.json()["logprobs"], direct, strict=True):
        assert got == pytest.approx(expected, abs=1e-6)


def _slow_sender(port: int, out: list, i: int) -> None:
    """A valid request whose body comes a byte a second; out[i] = the status line it got."""
    import socket

    body = json.dumps({"sequences": SEQS, "prompt_lengths": PLENS}).encode()
    head = (f"POST /score/add HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head)
        s.settimeout(1.0)
        for byte in body:
            try:
                s.sendall(bytes([byte]))
                answer = s.recv(4096)
            except TimeoutError:
                continue
            except OSError as e:  # the server closed the connection after answering
                out[i] = f"closed: {e}"
                return
            out[i] = answer.split(b"\r\n", 1)[0].decode()
            return
        out[i] = "no answer before the whole body was sent"


def test_slow_bodies_get_a_408_and_valid_requests_are_answered_meanwhile(served):
    """100 senders of a valid request whose body comes a byte a second (stalling every place
    of a 32-slot ingress, before): each gets a 408 once serve.body_timeout_s (2 s here) is
    out, and the valid requests sent meanwhile get their 200 with the scorer's numbers."""
    import threading
    import time

    port = int(served["url"].rsplit(":", 1)[1])
    out = [None] * 100
    senders = [threading.Thread(target=_slow_sender, args=(port, out, i)) for i in range(100)]
    for t in senders:
        t.start()
    time.sleep(0.5)
    start = time.time()
    answers = [_post(served, {"sequences": SEQS, "prompt_lengths": PLENS}) for _ in range(5)]
    waited = time.time() - start
    for t in senders:
        t.join(timeout=60)
    assert all(a.status_code == 200 and len(a.json()["logprobs"]) == 2 for a in answers)
    assert waited < 10, f"5 valid requests took {waited:.1f} s beside the slow senders"
    assert out == ["HTTP/1.1 408 Request Timeout"] * 100, sorted(set(map(str, out)))


def test_text_form_and_branch_listing(served):
    response = _post(served, {"prompt": "12+34=", "response": "46"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["prompt_length"] == 7 and len(body["tokens"]) == 9 and len(body["logprobs"][0]) == 2
    actor = ray.get(served["scorer"].score.remote([body["tokens"]], [body["prompt_length"]]))
    assert body["logprobs"][0] == pytest.approx(actor.logprobs[0], abs=1e-6)
    # The tiny policy has no chat template: chat messages are refused, and the server stays up.
    chat = _post(served, {"messages": [{"role": "user", "content": "12+34="}], "response": "46"})
    assert chat.status_code == 422 and "has no chat template" in chat.json()["error"]
    listing = requests.get(f"{served['url']}/branches", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert listing.json() == {"branches": [{"branch": "add", "version": 0}]}


@pytest.mark.parametrize("token", [None, "wrong"])
def test_a_missing_or_wrong_token_gets_401(served, token):
    assert _post(served, {"sequences": SEQS, "prompt_lengths": PLENS}, token=token).status_code == 401
    assert requests.get(f"{served['url']}/branches", timeout=30).status_code == 401


@pytest.mark.parametrize(
    "body, raw, status, message",
    [
        (None, b"{not json", 400, "not valid JSON"),
        ([1, 2], None, 422, "must be a JSON object"),
        ({"sequences": SEQS}, None, 422, "one length per sequence"),
        ({"sequences": "abc", "prompt_lengths": [1]}, None, 422, "sequences"),
        ({"sequences": [[1, 2.5]], "prompt_lengths": [1]}, None, 422, "sequences.0.1"),
        ({"sequences": [[1, 2, 999]], "prompt_lengths": [1]}, None, 422, "outside the vocabulary"),
        ({"sequences": [[1, 2, -3]], "prompt_lengths": [1]}, None, 422, "outside the vocabulary"),
        ({"sequences": [[1, 2]], "prompt_lengths": [5]}, None, 422, "prompt length 5 outside"),
        ({"sequences": [[1, 2]], "prompt_lengths": [0]}, None, 422, "prompt length 0 outside"),
        ({"sequences": [[1, 2]] * 9, "prompt_lengths": [1] * 9}, None, 413, "at most 8"),
        ({"sequences": [[1] * 65], "prompt_lengths": [1]}, None, 413, "at most 64"),
        ({"sequences": [[1, 2]], "prompt_lengths": [1], "top_k": 1000}, None, 422, "top_k"),
        ({"sequences": [[1, 2]], "prompt_lengths": [1], "extra": 1}, None, 422, "extra"),
        ({}, None, 422, "give sequences"),
        ({"sequences": [], "prompt_lengths": []}, None, 422, "no sequences"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_problem(served, body, raw, status, message):
    response = _post(served, body, raw=raw)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def _chunked(total: int):
    """A body sent without Content-Length, in 1 KiB chunks."""
    for _ in range(total // 1024):
        yield b" " * 1024


@pytest.mark.parametrize(
    "body, raw, status, message",
    [
        (None, b" " * BODY_CAP + b"{}", 413, f"a body of {BODY_CAP + 2} bytes; at most {BODY_CAP}"),
        (None, "chunked", 413, f"the body passed {BODY_CAP} bytes"),
        ({"sequences": [[1, 2]] * 9, "prompt_lengths": [1] * 9}, None, 413, "9 sequences; at most 8"),
        ({"sequences": [[1] * 65], "prompt_lengths": [1]}, None, 413, "a sequence of 65 tokens; at most 64"),
        ({"sequences": [[1] * 40] * 7, "prompt_lengths": [1] * 7}, None, 413, "make 280 tokens; at most 256"),
        ({"sequences": [[1] * 40] + [[1]] * 6, "prompt_lengths": [1] * 7}, None, 413, "longest (40 tokens)"),
        ({"prompt": "1" * 600, "response": "ab"}, None, 413, "are 602 bytes of UTF-8; at most 512"),
        ({"prompt": "1", "response": "é" * 256}, None, 413, "are 513 bytes of UTF-8"),
        ({"prompt": "1" * 100, "response": "2"}, None, 413, "a sequence of 102 tokens; at most 64"),
        (None, b"[" * 5000 + b"]" * 5000, 400, "not valid JSON"),
        (None, b'{"prompt": "\xff", "response": "1"}', 400, "not valid JSON"),
        (None, b'{"prompt": "\\ud800", "response": "1"}', 422, "valid Unicode"),
    ],
)
def test_an_oversized_or_undecodable_request_never_reaches_the_scorer(served, body, raw, status, message):
    calls = ray.get(served["scorer"].info.remote())["score_calls"]
    response = _post(served, body, raw=_chunked(BODY_CAP + 4096) if raw == "chunked" else raw)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert ray.get(served["scorer"].info.remote())["score_calls"] == calls
    assert _post(served, {"sequences": SEQS, "prompt_lengths": PLENS}).status_code == 200  # still serving
    assert ray.get(served["scorer"].info.remote())["score_calls"] == calls + 1


def test_openapi_needs_the_token_and_the_docs_pages_are_off(served):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.get(f"{served['url']}/openapi.json", timeout=30).status_code == 401
    schema = requests.get(f"{served['url']}/openapi.json", headers=auth, timeout=30)
    assert schema.status_code == 200, schema.text
    score = schema.json()["paths"]["/score/{branch}"]["post"]
    # The request object is no parameter: FastAPI took it for a query parameter when its
    # annotation had not resolved in the replica (every request then got a 422).
    assert [(p["name"], p["in"]) for p in score["parameters"]] == [("branch", "path")]
    assert "sequences" in score["requestBody"]["content"]["application/json"]["schema"]["properties"]
    for page in ("/docs", "/redoc"):
        assert requests.get(f"{served['url']}{page}", headers=auth, timeout=30).status_code == 404


def test_no_annotation_of_a_deployment_method_is_a_string():
    """Serve ships the methods by value; a string annotation would not resolve there."""
    import inspect

    from copd_ray.serve import app

    assert not hasattr(app, "annotations")  # `from __future__ import annotations` turns every one into a string
    methods = [fn for deployment in (app.ScoringAPI, app.BranchScorer)
               for _, fn in inspect.getmembers(deployment.func_or_class, inspect.isfunction)
               if fn.__module__ == app.__name__]
    assert {"score", "list_branches", "openapi", "encode"} <= {fn.__name__ for fn in methods}
    for fn in methods:
        assert not any(isinstance(a, str) for a in fn.__annotations__.values()), fn


@pytest.mark.parametrize("token", ["", "  "])
def test_an_empty_token_is_refused_before_anything_starts(token, tmp_path):
    from copd_ray.serve import start_serving
    from copd_ray.serve.saved import serve_saved

    with pytest.raises(ServeError, match="the serve token is empty"):
        start_serving({}, {}, "127.0.0.1", free_port(), token)
    with pytest.raises(ServeError, match="the serve token is empty"):
        serve_saved([str(tmp_path)], "127.0.0.1", free_port(), token, EngineConfig().model_dump(), block=False)


def test_a_busy_or_foreign_address_is_one_line():
    import socket

    from copd_ray.serve.app import check_bindable

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServeError, match=f"^127.0.0.1:{port} is already in use; pick another serve.port"):
            check_bindable("127.0.0.1", port)
    check_bindable("127.0.0.1", port)  # free again
    with pytest.raises(ServeError, match="cannot listen on 203.0.113.7:8000"):  # TEST-NET-3: on no interface here
        check_bindable("203.0.113.7", 8000)


@pytest.mark.parametrize("host, token, warned", [("0.0.0.0", None, True), ("myhost.example", None, True),
                                                 ("0.0.0.0", TOKEN, False), ("127.0.0.1", None, False),
                                                 ("::1", None, False), ("localhost", None, False)])
def test_serving_beyond_loopback_without_a_token_warns(host, token, warned, capsys, caplog):
    from copd_ray.serve.app import _warn_if_open

    _warn_if_open(host, 8000, token)
    printed = capsys.readouterr().err
    assert ("without a token" in printed) == warned and ("without a token" in caplog.text) == warned


def test_unknown_branch_is_404(served):
    response = _post(served, {"sequences": SEQS, "prompt_lengths": PLENS}, branch="video")
    assert response.status_code == 404 and "unknown branch 'video'" in response.json()["error"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30,
)
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={"sequences": json_values, "prompt_lengths": json_values,
                                        "top_k": json_values, "prompt": json_values, "response": json_values}),
    st.fixed_dictionaries({"sequences": st.lists(st.lists(st.integers(-5, 200), max_size=70), max_size=10),
                           "prompt_lengths": st.lists(st.integers(-3, 80), max_size=10),
                           "top_k": st.integers(-2, 100)}),
)


def test_fuzzed_requests_never_get_a_5xx(served):
    statuses = []

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=bodies | st.binary(max_size=200).map(lambda raw: ("raw", raw)))
    def check(body):
        if isinstance(body, tuple) and body and body[0] == "raw":
            response = _post(served, None, raw=body[1])
        else:
            response = _post(served, body)
        statuses.append(response.status_code)
        assert response.status_code < 500, (body, response.text)

    check()
    assert len(statuses) >= 300 and any(s == 422 for s in statuses)
    assert _post(served, {"sequences": SEQS, "prompt_lengths": PLENS}).status_code == 200


def test_training_routes_teacher_scoring_through_serve_with_the_same_results(warm_pool, tiny_folder, tmp_path):
    """The same run twice, teachers reached by actor handles and by Serve deployment
    handles: every training number agrees, and the versions the teachers report too."""
    import json

    from copd_ray.config import load_config
    from copd_ray.driver import train

    common = ["wandb.mode=disabled", *SMALL_ACTORS, *SMALL_STEPS, "capabilities.0.heldout_size=20", "capabilities.1.heldout_size=20",
              "eval.every=0", "metrics.pair_every=0", "schedule.cycles=1", "schedule.rl_steps=1",
              "schedule.opd_steps=2", f"model.path={tiny_folder}"]
    runs = {}
    for transport in ("actor", "serve"):
        out = tmp_path / transport
        extra = [f"serve.enabled={transport == 'serve'}", f"topology.transport={transport}",
                 f"serve.port={free_port()}", f"output_dir={out}"]
        train(load_config(None, common + extra), pool=warm_pool)
        runs[transport] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                           if json.loads(line)["kind"] == "step"]
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time/")}  # noqa: E731
    assert [strip(r) for r in runs["serve"]] == [strip(r) for r in runs["actor"]]
    assert {r["opd/mul/teacher_version"] for r in runs["serve"] if r["branch"] == "add" and r["phase"] == "opd"} == {1, 2}


def test_copd_ray_serve_serves_a_runs_saved_branches(tmp_path, tiny_folder):
    """`copd-ray serve RUN -c CONFIG -s KEY=VALUE`: every saved branch, with the request
    limits of the config and its overrides."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    for name in ("add", "mul"):
        shutil.copytree(tiny_folder, run / "branches" / name)
    port = free_port()
    (tmp_path / "limits.yaml").write_text("serve:\n  max_tokens: 64\n")
    proc = subprocess.Popen([sys.executable, "-m", "copd_ray.cli", "serve", str(run), "--port", str(port),
                             "-c", str(tmp_path / "limits.yaml"), "-s", "serve.max_sequences=2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**__import__("os").environ, "COPD_RAY_SERVE_TOKEN": TOKEN, "RAY_USAGE_STATS_ENABLED": "0"},
                            preexec_fn=sigint_reaches_child)
    try:
        url, deadline, listing = f"http://127.0.0.1:{port}", time.time() + 180, None
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                listing = requests.get(f"{url}/branches", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
                if listing.status_code == 200:
                    break
            except requests.RequestException:  # not up yet
                pass
            time.sleep(1)
        assert listing is not None and listing.json()["branches"] == [{"branch": "add", "version": 0},
                                                                      {"branch": "mul", "version": 0}]
        scored = requests.post(f"{url}/score/mul", json={"sequences": SEQS, "prompt_lengths": PLENS},
                               headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        assert scored.status_code == 200 and len(scored.json()["logprobs"][0]) == len(SEQS[0]) - PLENS[0]
        assert requests.get(f"{url}/branches", timeout=5).status_code == 401
        three = requests.post(f"{url}/score/mul", json={"sequences": SEQS + SEQS[:1], "prompt_lengths": PLENS + PLENS[:1]},
                              headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        assert three.status_code == 413 and "at most 2 a request" in three.json()["error"]  # -s serve.max_sequences=2
        long = requests.post(f"{url}/score/mul", json={"sequences": [SEQS[0] * 6], "prompt_lengths": [9]},
                             headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        assert long.status_code == 413 and "at most 64" in long.json()["error"]  # the config's serve.max_tokens
        import psutil  # its own local Ray runs no dashboard, as `train`'s does not

        started = [" ".join(c.cmdline()) for c in psutil.Process(proc.pid).children(recursive=True)]
        heads = [c for c in started if "dashboard/dashboard.py" in c]  # Ray keeps a minimal one, without the UI
        assert any("raylet" in c for c in started) and heads and all("--disable-frontend" in c for c in heads)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)

