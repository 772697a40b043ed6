"""The rollout-engine interface on SGLang's offline engine (`sglang.Engine`).

Written against SGLang's documented engine API (`generate` with `input_ids`,
`return_logprob`, `logprob_start_len`, `top_logprobs_num`; `update_weights_from_tensor`).
SGLang needs CUDA: on a CPU-only machine it does not import, so only the request
building and output parsing below are exercised there (see the README).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from copd_ray.engines.base import (RolloutEngine, Sample, SamplingParams, Scores, check_score_request,
                                   require_token_ids)


def sampling_requests(prompts: Sequence[Sequence[int]], params: SamplingParams) -> tuple[list[list[int]], list[dict]]:
    """One request per sample (prompt repeated n times, each with its own seed), so that
    seeded sampling gives n different samples and results map back to prompts by position."""
    input_ids, sampling = [], []
    for prompt in prompts:
        for j in range(params.n):
            input_ids.append(list(prompt))
            request = {
                "temperature": params.temperature,
                "top_p": params.top_p,
                "max_new_tokens": params.max_new_tokens,
                "stop_token_ids": list(params.stop_token_ids),
            }
            if params.seed is not None:
                request["sampling_seed"] = params.seed * 1_000_003 + len(sampling)
            sampling.append(request)
    return input_ids, sampling


def _finish_reason(meta: dict) -> str:
    reason = meta.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, dict) else reason
    return "stop" if kind in ("stop", "eos") else "length"


def parse_generation(prompt_index: int, output: dict, top_k: int) -> Sample:
    """A Sample from one SGLang output: `meta_info.output_token_logprobs` holds
    (logprob, token_id, text) per generated token, `output_top_logprobs` the top lists."""
    meta = output["meta_info"]
    entries = meta["output_token_logprobs"]
    tops = meta.get("output_top_logprobs") if top_k else None
    return Sample(
        prompt_index=prompt_index,
        token_ids=[int(e[1]) for e in entries],
        logprobs=[float(e[0]) for e in entries],
        finish_reason=_finish_reason(meta),
        top_k_ids=[[int(t[1]) for t in row[:top_k]] for row in tops] if tops else None,
        top_k_logprobs=[[float(t[0]) for t in row[:top_k]] for row in tops] if tops else None,
    )


def scoring_request(sequence: Sequence[int], prompt_length: int, top_k: int) -> dict:
    """Teacher-forced scoring: no new tokens, log-probs from the last prompt position on
    (one position early, so an engine that leaves the first entry empty still covers
    every response token)."""
    return {
        "input_ids": list(sequence),
        "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
        "return_logprob": True,
        "logprob_start_len": max(prompt_length - 1, 0),
        "top_logprobs_num": top_k,
    }


def parse_scores(sequence: Sequence[int], prompt_length: int, output: dict, top_k: int):
    """Response-token log-probs (and top-k) from `meta_info.input_token_logprobs`."""
    n = len(sequence) - prompt_length
    meta = output["meta_info"]
    entries = meta["input_token_logprobs"][-n:] if n else []
    ids = [int(e[1]) for e in entries]
    if ids != list(sequence[prompt_length:]):
        raise RuntimeError(f"SGLang scored tokens {ids[:8]}..., expected {list(sequence[prompt_length:])[:8]}...")
    logprobs = [float(e[0]) for e in entries]
    tops = None
    if top_k and n:
        rows = meta["input_top_logprobs"][-n:]
        tops = ([[int(t[1]) for t in r[:top_k]] for r in rows], [[float(t[0]) for t in r[:top_k]] for r in rows])
    return logprobs, tops


class SGLangEngine(RolloutEngine):
    def __init__(self, model_path: str, dtype: str = "float32", mem_fraction_static: float = 0.5,
                 seed: int = 0, trust_remote_code: bool = False, version: int = 0, **engine_args: Any) -> None:
        import sglang

        self.engine = sglang.Engine(
            model_path=model_path, dtype=dtype, mem_fraction_static=mem_fraction_static, random_seed=seed,
            trust_remote_code=trust_remote_code, skip_tokenizer_init=True, **engine_args,
        )
        from transformers import AutoConfig

        self.vocab_size = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code).vocab_size
        self.version = version

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Sample]:
        require_token_ids(prompts, "SGLang")
        input_ids, sampling = sampling_requests(prompts, params)
        outputs = self.engine.generate(input_ids=input_ids, sampling_params=sampling, return_logprob=True,
                                       top_logprobs_num=params.top_k_logprobs)
        return [parse_generation(i // params.n, out, params.top_k_logprobs) for i, out in enumerate(outputs)]

    def score(self, sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int], top_k: int = 0) -> Scores:
        require_token_ids(sequences, "SGLang")
        check_score_request(sequences, prompt_lengths, self.vocab_size)
        requests = [scoring_request(s, p, top_k) for s, p in zip(sequences, prompt_lengths)]
        outputs = self.engine.generate(
            input_ids=[r["input_ids"] for r in requests],
            sampling_params=[r["sampling_params"] for r in requests],
            return_logprob=True,
            logprob_start_len=[r["logprob_start_len"] for r in requests],
            top_logprobs_num=top_k,
        )
        logprobs, top_ids, top_lps = [], [], []
        for seq, p, out in zip(sequences, prompt_lengths, outputs):
            lps, tops = parse_scores(seq, p, out, top_k)
            logprobs.append(lps)
            if top_k:
                top_ids.append(tops[0] if tops else [])
                top_lps.append(tops[1] if tops else [])
        return Scores(logprobs=logprobs, version=self.version,
                      top_k_ids=top_ids if top_k else None, top_k_logprobs=top_lps if top_k else None)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        result = self.engine.update_weights_from_tensor(named_tensors=list(named_tensors), flush_cache=True)
        ok = result[0] if isinstance(result, tuple) else getattr(result, "success", True)
        if not ok:
            raise RuntimeError(f"SGLang rejected the weight update: {result}")
        self.version = version
