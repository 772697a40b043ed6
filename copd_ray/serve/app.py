"""Live teacher scoring over HTTP: a Ray Serve application with one deployment per branch.

Each `BranchScorer` deployment fronts its branch's ScorerActor, which holds the branch's
live weights (the same broadcast feeds it), so every answer carries the version it was
computed with. `ScoringAPI` is the HTTP ingress: it checks the bearer token and every field,
so bad input gets a 4xx with a message and never reaches the model.

    POST /score/{branch}  {"sequences": [[int]], "prompt_lengths": [int], "top_k": 0}
                          or {"prompt": str, "response": str, "top_k": 0}
    GET  /branches
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

APP_NAME = "copd-ray"

api = FastAPI(title="copd-ray teacher scoring")


class ScoreBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    sequences: list[list[int]] | None = None
    prompt_lengths: list[int] | None = None
    prompt: str | None = None
    response: str | None = None
    top_k: int = Field(0, ge=0)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


@serve.deployment(ray_actor_options={"num_cpus": 0})
class BranchScorer:
    def __init__(self, branch: str, scorer, model_path: str) -> None:
        from transformers import AutoTokenizer

        self.branch = branch
        self.scorer = scorer  # the branch's ScorerActor: live weights, versioned
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.vocab_size: int | None = None

    async def info(self) -> dict:
        info = await self.scorer.info.remote()
        self.vocab_size = info["vocab_size"]
        return info

    async def score(self, sequences: list[list[int]], prompt_lengths: list[int], top_k: int = 0):
        return await self.scorer.score.remote(sequences, prompt_lengths, top_k)

    def encode(self, prompt: str, response: str) -> tuple[list[int], int]:
        """Prompt (with the tokenizer's special tokens) followed by the response tokens."""
        prompt_ids = self.tokenizer(prompt)["input_ids"]
        response_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        return prompt_ids + response_ids, len(prompt_ids)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class ScoringAPI:
    def __init__(self, branches: dict[str, Any], token: str | None, max_sequences: int,
                 max_tokens: int, max_top_k: int) -> None:
        self.branches = branches  # name -> BranchScorer deployment handle
        self.token = token
        self.max_sequences, self.max_tokens, self.max_top_k = max_sequences, max_tokens, max_top_k
        self.vocab: dict[str, int] = {}

    def _authorized(self, request: Request) -> bool:
        if not self.token:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), self.token.encode())

    async def _vocab_size(self, branch: str) -> int:
        if branch not in self.vocab:
            self.vocab[branch] = (await self.branches[branch].info.remote())["vocab_size"]
        return self.vocab[branch]

    @api.get("/branches")
    async def list_branches(self, request: Request):
        if not self._authorized(request):
            return _error(401, "missing or wrong bearer token")
        infos = [await handle.info.remote() for handle in self.branches.values()]
        return {"branches": [{"branch": i["branch"], "version": i["version"]} for i in infos]}

    @api.post("/score/{branch}")
    async def score(self, branch: str, request: Request):
        if not self._authorized(request):
            return _error(401, "missing or wrong bearer token")
        if branch not in self.branches:
            return _error(404, f"unknown branch {branch!r}; branches: {sorted(self.branches)}")
        try:
            raw = await request.json()
        except Exception:  # noqa: BLE001 - any undecodable body is the client's error
            return _error(400, "the body is not valid JSON")
        if not isinstance(raw, dict):
            return _error(422, "the body must be a JSON object")
        try:
            body = ScoreBody.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()[:5])
            return _error(422, problems)
        handle = self.branches[branch]

        if body.sequences is not None:
            if body.prompt is not None or body.response is not None:
                return _error(422, "give either sequences and prompt_lengths, or prompt and response, not both")
            if body.prompt_lengths is None or len(body.prompt_lengths) != len(body.sequences):
                return _error(422, "prompt_lengths must give one length per sequence")
            sequences, prompt_lengths = body.sequences, body.prompt_lengths
        elif body.prompt is not None and body.response is not None:
            if body.prompt_lengths is not None:
                return _error(422, "prompt_lengths goes with sequences, not with prompt/response")
            sequence, plen = await handle.encode.remote(body.prompt, body.response)
            sequences, prompt_lengths = [sequence], [plen]
        else:
            return _error(422, "give sequences and prompt_lengths, or prompt and response")

        if not sequences:
            return _error(422, "no sequences to score")
        if len(sequences) > self.max_sequences:
            return _error(413, f"{len(sequences)} sequences; at most {self.max_sequences} a request")
        longest = max(len(s) for s in sequences)
        if longest > self.max_tokens:
            return _error(413, f"a sequence of {longest} tokens; at most {self.max_tokens}")
        if body.top_k > self.max_top_k:
            return _error(422, f"top_k {body.top_k} is over the limit of {self.max_top_k}")
        vocab = await self._vocab_size(branch)
        for i, (seq, p) in enumerate(zip(sequences, prompt_lengths)):
            if not 1 <= p <= len(seq):
                return _error(422, f"sequence {i}: prompt length {p} outside [1, {len(seq)}]")
            bad = [t for t in seq if not 0 <= t < vocab]
            if bad:
                return _error(422, f"sequence {i}: token ids {bad[:5]} outside the vocabulary [0, {vocab})")

        scores = await handle.score.remote(sequences, prompt_lengths, body.top_k)
        out = {"branch": branch, "version": scores.version, "logprobs": scores.logprobs}
        if body.top_k:
            out["top_k_ids"], out["top_k_logprobs"] = scores.top_k_ids, scores.top_k_logprobs
        if body.prompt is not None:
            out["tokens"] = sequences[0]
            out["prompt_length"] = prompt_lengths[0]
        return out


def build_app(scorers: dict[str, Any], model_paths: dict[str, str], token: str | None = None,
              max_sequences: int = 256, max_tokens: int = 8192, max_top_k: int = 64):
    """The application: one BranchScorer deployment per branch behind the HTTP ingress."""
    branch_deployments = {
        name: BranchScorer.options(name=f"scorer-{name}").bind(name, scorer, model_paths[name])
        for name, scorer in scorers.items()
    }
    return ScoringAPI.options(name="api").bind(branch_deployments, token, max_sequences, max_tokens, max_top_k)


def start_serving(scorers: dict[str, Any], model_paths: dict[str, str], host: str = "127.0.0.1", port: int = 8000,
                  token: str | None = None, max_sequences: int = 256, max_tokens: int = 8192,
                  max_top_k: int = 64) -> dict[str, Any]:
    """Run the app on this Ray cluster and return {branch: BranchScorer deployment handle}."""
    serve.start(http_options={"host": host, "port": port}, logging_config={"enable_access_log": False})
    serve.run(build_app(scorers, model_paths, token, max_sequences, max_tokens, max_top_k),
              name=APP_NAME, route_prefix="/", logging_config={"enable_access_log": False})
    return {name: serve.get_deployment_handle(f"scorer-{name}", app_name=APP_NAME) for name in scorers}


def stop_serving() -> None:
    serve.delete(APP_NAME)
