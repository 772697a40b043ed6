"""Live teacher scoring over HTTP: a Ray Serve application with one deployment per branch.

Each branch's ScorerActor holds the branch's live weights (the same broadcast feeds it), so
every answer carries the version it was computed with. A `BranchScorer` deployment per
branch holds its tokenizer and gives in-cluster callers a Serve deployment handle to the
scorer (topology.transport=serve). `ScoringAPI` is the HTTP ingress: it checks the bearer
token, then the request's size, then every field, so bad or oversized input gets a 4xx
with a message and never reaches the model (nor the tokenizer, beyond a few kB of text).

    POST /score/{branch}  {"sequences": [[int]], "prompt_lengths": [int], "top_k": 0}
                          or {"prompt": str, "response": str, "top_k": 0}
    GET  /branches
    GET  /openapi.json    (the interactive /docs and /redoc pages are off)

How the default limits were sized (benchmarks/scorer_memory.py measures them): the hf
scorer pads a request to its longest sequence and holds logits for every padded token,
[sequences x longest x vocab], twice over (the logits and their float32 log-softmax; a
bf16 model keeps its bf16 logits too). Measured: 1.17 MB a padded token at a real
151,936-token vocabulary (float32; about 1.5 MB in bf16), 11-14 KB on the tiny policy. So
`max_request_tokens` (sequences x longest) caps what a request may cost, 4096 by default:
4.7 GB measured at that vocabulary (~6 GB in bf16), what a scorer can spare beside its
weights on a 24 GB machine or a GPU it shares; 45-57 MB on the tiny policy.
`max_sequences` and `max_tokens` alone allowed 256 x 8192 padded tokens: 23 GB on the
tiny policy and terabytes at a real vocabulary.
"""

# No `from __future__ import annotations` in this module: `@serve.deployment` makes
# cloudpickle ship the endpoint functions by value, with only the globals their code uses,
# so a string annotation such as 'Request' no longer resolves in the replica, and FastAPI
# then takes `request` for a required query parameter (every call a 422). Real objects
# travel with the functions. tests/test_serve.py checks that no annotation here is a string.

import asyncio
import errno
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import sys
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from copd_ray.data.templates import chat_ids
from copd_ray.errors import CopdError

APP_NAME = "copd-ray"

# Text is capped in UTF-8 bytes before it is tokenized: tokenizing takes time linear in
# the bytes, so the cap bounds that work, and the token count is checked again after
# tokenizing, before the model, so no text overruns the token caps whatever its density.
# 8 bytes a token lets through any text that could fit at ordinary densities (BPE
# vocabularies average 3-5 bytes a token on prose and code; the character tokenizer 1).
TEXT_BYTES_PER_TOKEN = 8
# The largest valid body in JSON: a token id takes at most 8 bytes (", 151935"), about 16
# pretty-printed one a line; a text byte at most 6 (an escaped \uXXXX), so 48 a token.
# Parsing takes up to 42x a body's size (measured: a body of one-token lists), so the
# default cap, 256 KiB, parses to at most ~11 MB.
BODY_BYTES_PER_TOKEN = 64

log = logging.getLogger(__name__)


class ServeError(CopdError):
    """The scoring API cannot start as asked (token, address)."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything beyond gets a 413 before it costs anything."""

    max_sequences: int
    max_tokens: int  # per sequence
    max_request_tokens: int  # sequences x longest: what the scorer pads and holds logits for
    max_top_k: int
    max_body_bytes: int
    body_timeout_s: float  # the whole body must arrive within this, or the request gets a 408

    @property
    def max_text_bytes(self) -> int:
        return TEXT_BYTES_PER_TOKEN * min(self.max_tokens, self.max_request_tokens)


api = FastAPI(title="copd-ray teacher scoring", docs_url=None, redoc_url=None, openapi_url=None)


class ScoreBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    sequences: list[list[int]] | None = None
    prompt_lengths: list[int] | None = None
    prompt: str | None = None
    # Instead of `prompt`: chat messages, which go through the branch tokenizer's chat
    # template (with the assistant's turn opened), as a chat policy was prompted in training.
    messages: list[dict[str, str]] | None = None
    response: str | None = None
    top_k: int = Field(0, ge=0)


class Rejected(Exception):
    """A request answered with a 4xx before it reaches the model."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@serve.deployment(ray_actor_options={"num_cpus": 0})
class BranchScorer:
    def __init__(self, branch: str, scorer, model_path: str) -> None:
        from transformers import AutoTokenizer

        self.branch = branch
        self.scorer = scorer  # the branch's ScorerActor: live weights, versioned
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)

    async def info(self) -> dict:
        return await self.scorer.info.remote()

    async def score(self, sequences: list[list[int]], prompt_lengths: list[int], top_k: int = 0):
        return await self.scorer.score.remote(sequences, prompt_lengths, top_k)

    def encode(self, prompt: str | None, response: str, messages: list[dict] | None = None) -> tuple[list[int], int]:
        """Prompt (with the tokenizer's special tokens), or chat messages through the chat
        template, followed by the response tokens; a ValueError for messages without a template."""
        if messages is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(f"branch {self.branch!r} has no chat template: send prompt instead of messages")
            prompt_ids = chat_ids(self.tokenizer, messages)
        else:
            prompt_ids = self.tokenizer(prompt)["input_ids"]
        response_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        return prompt_ids + response_ids, len(prompt_ids)


# A request spends its time in the ingress awaiting the scorer: at Serve's default of 5 at
# a time the scorer sat mostly idle under 16 clients (benchmarks/serve_load.py: 24 -> 66
# requests/s). Up to 256 requests may be reading their bodies at once (each at most the body
# cap, and for at most body_timeout_s: slow senders cannot take every place), and 32 at a time
# go on to be parsed and scored (32 parsed bodies at the default cap hold ~350 MB at most).
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(api)
class ScoringAPI:
    def __init__(self, branches: dict[str, Any], scorers: dict[str, Any], token_digest: bytes | None,
                 limits: Limits) -> None:
        self.branches = branches  # name -> BranchScorer deployment handle: the branch's tokenizer
        # name -> ScorerActor, called directly: a hop through BranchScorer cost a quarter of a
        # small request's latency (benchmarks/scoring_latency.py: 8 of 33 ms)
        self.scorers = scorers
        self.token_digest = token_digest  # the token itself never leaves the process that started serving
        self.limits = limits
        self.vocab: dict[str, int] = {}
        self.parsing = asyncio.Semaphore(32)

    def _authorized(self, request: Request) -> bool:
        if self.token_digest is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(_digest(given), self.token_digest)

    async def _vocab_size(self, branch: str) -> int:
        if branch not in self.vocab:
            self.vocab[branch] = (await self.scorers[branch].info.remote())["vocab_size"]
        return self.vocab[branch]

    @api.get("/branches")
    async def list_branches(self, request: Request):
        if not self._authorized(request):
            return _error(401, "missing or wrong bearer token")
        infos = [await scorer.info.remote() for scorer in self.scorers.values()]
        return {"branches": [{"branch": i["branch"], "version": i["version"]} for i in infos]}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request):
        if not self._authorized(request):
            return _error(401, "missing or wrong bearer token")
        return request.app.openapi()

    @api.post("/score/{branch}", openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": ScoreBody.model_json_schema()}}}})
    async def score(self, branch: str, request: Request):
        if not self._authorized(request):
            return _error(401, "missing or wrong bearer token")
        if branch not in self.branches:
            return _error(404, f"unknown branch {branch!r}; branches: {sorted(self.branches)}")
        try:
            return await self._score(branch, request)
        except Rejected as e:
            return _error(e.status, str(e))

    async def _score(self, branch: str, request: Request) -> dict:
        raw = await self._read_body(request)
        async with self.parsing:
            return await self._score_body(branch, raw)

    async def _score_body(self, branch: str, raw: bytes) -> dict:
        try:
            body = ScoreBody.model_validate(self._parse_json(raw))
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()[:5])
            raise Rejected(422, problems) from None
        sequences, prompt_lengths = await self._sequences(branch, body)
        if body.top_k > self.limits.max_top_k:
            raise Rejected(422, f"top_k {body.top_k} is over the limit of {self.limits.max_top_k}")
        vocab = await self._vocab_size(branch)
        for i, (seq, p) in enumerate(zip(sequences, prompt_lengths)):
            if not 1 <= p <= len(seq):
                raise Rejected(422, f"sequence {i}: prompt length {p} outside [1, {len(seq)}]")
            bad = [t for t in seq if not 0 <= t < vocab]
            if bad:
                raise Rejected(422, f"sequence {i}: token ids {bad[:5]} outside the vocabulary [0, {vocab})")

        scores = await self.scorers[branch].score.remote(sequences, prompt_lengths, body.top_k)
        out = {"branch": branch, "version": scores.version, "logprobs": scores.logprobs}
        if body.top_k:
            out["top_k_ids"], out["top_k_logprobs"] = scores.top_k_ids, scores.top_k_logprobs
        if body.sequences is None:  # the text form: what it was read as
            out["tokens"] = sequences[0]
            out["prompt_length"] = prompt_lengths[0]
        return out

    async def _read_body(self, request: Request) -> bytes:
        """The body, read no further than the body cap (a declared Content-Length over it is
        refused unread, and a chunked body is counted as it arrives) and for no longer than
        body_timeout_s (a slow or stalled sender gets a 408 and frees its place)."""
        lim = self.limits
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > lim.max_body_bytes:
            raise Rejected(413, f"a body of {declared} bytes; at most {lim.max_body_bytes} a request")
        raw = bytearray()
        try:
            async with asyncio.timeout(lim.body_timeout_s):
                async for chunk in request.stream():
                    raw += chunk
                    if len(raw) > lim.max_body_bytes:
                        raise Rejected(413, f"the body passed {lim.max_body_bytes} bytes; at most "
                                            f"{lim.max_body_bytes} a request")
        except TimeoutError:
            raise Rejected(408, f"the body did not arrive within {lim.body_timeout_s:g} s "
                                "(serve.body_timeout_s)") from None
        return bytes(raw)

    @staticmethod
    def _parse_json(raw: bytes) -> dict:
        """The body as a JSON object."""
        try:
            parsed = json.loads(raw)
        except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested too deep
            raise Rejected(400, "the body is not valid JSON") from None
        if not isinstance(parsed, dict):
            raise Rejected(422, "the body must be a JSON object")
        return parsed

    async def _sequences(self, branch: str, body: ScoreBody) -> tuple[list[list[int]], list[int]]:
        """(sequences, prompt lengths) of either form, within the size limits."""
        if body.sequences is not None:
            if body.prompt is not None or body.messages is not None or body.response is not None:
                raise Rejected(422, "give either sequences and prompt_lengths, or prompt and response, not both")
            if body.prompt_lengths is None or len(body.prompt_lengths) != len(body.sequences):
                raise Rejected(422, "prompt_lengths must give one length per sequence")
            self._check_sizes(body.sequences)
            return body.sequences, body.prompt_lengths
        if (body.prompt is None) == (body.messages is None) or body.response is None:
            raise Rejected(422, "give sequences and prompt_lengths, or prompt (or messages) and response")
        if body.prompt_lengths is not None:
            raise Rejected(422, "prompt_lengths goes with sequences, not with prompt/response")
        if body.messages is not None and not all({"role", "content"} <= set(m) for m in body.messages):
            raise Rejected(422, "each message needs a role and a content")
        texts = [body.prompt or "", body.response, *(v for m in body.messages or [] for v in m.values())]
        try:
            size = sum(len(t.encode()) for t in texts)
        except UnicodeEncodeError:  # a lone surrogate (\ud800) is valid JSON but no text
            raise Rejected(422, "prompt and response must be valid Unicode text") from None
        if size > self.limits.max_text_bytes:
            raise Rejected(413, f"prompt and response are {size} bytes of UTF-8; at most {self.limits.max_text_bytes}")
        try:
            sequence, plen = await self.branches[branch].encode.remote(body.prompt, body.response, body.messages)
        except ValueError as e:
            raise Rejected(422, str(e)) from None
        self._check_sizes([sequence])
        return [sequence], [plen]

    def _check_sizes(self, sequences: list[list[int]]) -> None:
        lim = self.limits
        if not sequences:
            raise Rejected(422, "no sequences to score")
        if len(sequences) > lim.max_sequences:
            raise Rejected(413, f"{len(sequences)} sequences; at most {lim.max_sequences} a request")
        longest = max(len(s) for s in sequences)
        if longest > lim.max_tokens:
            raise Rejected(413, f"a sequence of {longest} tokens; at most {lim.max_tokens}")
        if len(sequences) * longest > lim.max_request_tokens:
            raise Rejected(413, f"{len(sequences)} sequences padded to the longest ({longest} tokens) make "
                                f"{len(sequences) * longest} tokens; at most {lim.max_request_tokens} a request")


def check_token(token: str | None) -> None:
    """None turns auth off; an empty token would too, silently, so it is refused."""
    if token is not None and not token.strip():
        raise ServeError("the serve token is empty; give a non-empty serve.token, --token or "
                         "COPD_RAY_SERVE_TOKEN, or none at all for no auth")


def check_address(host: str, port: int) -> None:
    """Refuse an address Ray Serve could not listen on, before it tries and fails with a
    traceback. A Serve already running on this cluster keeps its own address (Ray applies
    http options only when it starts Serve), so then there is nothing to check."""
    if not serve_running():
        check_bindable(host, port)


def check_bindable(host: str, port: int) -> None:
    what_to_do = "pick another serve.port (or --port for copd-ray serve)"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server will
            s.bind(address)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ServeError(f"{host}:{port} is already in use; {what_to_do}") from None
        raise ServeError(f"cannot listen on {host}:{port} ({e.strerror or e}); check serve.host (or --host), "
                         f"or {what_to_do}") from None


def _warn_if_open(host: str, port: int, token: str | None) -> None:
    if token is not None or host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:  # a host name: it may resolve beyond this machine
        pass
    message = (f"serving on {host}:{port} without a token: anyone who can reach it can use the scorers; "
               f"set serve.token, --token or COPD_RAY_SERVE_TOKEN")
    log.warning(message)
    print(f"warning: {message}", file=sys.stderr)


def build_app(scorers: dict[str, Any], model_paths: dict[str, str], token: str | None = None,
              max_sequences: int = 256, max_tokens: int = 4096, max_top_k: int = 64, *,
              max_request_tokens: int = 4096, max_body_bytes: int | None = None, body_timeout_s: float = 10.0):
    """The application: one BranchScorer deployment per branch behind the HTTP ingress.
    The body cap defaults to what the largest allowed request needs (BODY_BYTES_PER_TOKEN)."""
    check_token(token)
    limits = Limits(max_sequences, max_tokens, max_request_tokens, max_top_k,
                    max_body_bytes or BODY_BYTES_PER_TOKEN * min(max_request_tokens, max_sequences * max_tokens),
                    body_timeout_s)
    branch_deployments = {
        name: BranchScorer.options(name=f"scorer-{name}").bind(name, scorer, model_paths[name])
        for name, scorer in scorers.items()
    }
    return ScoringAPI.options(name="api").bind(branch_deployments, scorers, None if token is None else _digest(token),
                                               limits)


def start_serving(scorers: dict[str, Any], model_paths: dict[str, str], host: str = "127.0.0.1", port: int = 8000,
                  token: str | None = None, max_sequences: int = 256, max_tokens: int = 4096,
                  max_top_k: int = 64, *, max_request_tokens: int = 4096,
                  max_body_bytes: int | None = None, body_timeout_s: float = 10.0) -> dict[str, Any]:
    """Run the app on this Ray cluster and return {branch: BranchScorer deployment handle}."""
    app = build_app(scorers, model_paths, token, max_sequences, max_tokens, max_top_k,
                    max_request_tokens=max_request_tokens, max_body_bytes=max_body_bytes,
                    body_timeout_s=body_timeout_s)
    check_address(host, port)
    _warn_if_open(host, port, token)
    serve.start(http_options={"host": host, "port": port}, logging_config={"enable_access_log": False})
    serve.run(app, name=APP_NAME, route_prefix="/", logging_config={"enable_access_log": False})
    return {name: serve.get_deployment_handle(f"scorer-{name}", app_name=APP_NAME) for name in scorers}


def serve_running() -> bool:
    """Whether Ray Serve already runs on this cluster (then it keeps its own address)."""
    return bool(serve.status().proxies)


def stop_serving(shutdown: bool = False) -> None:
    """Delete the app; with `shutdown` (for whoever started Serve) stop Serve too, which
    frees its port: a deleted app alone leaves the proxy listening for the Ray session."""
    if shutdown:
        serve.shutdown()
    else:
        serve.delete(APP_NAME)
