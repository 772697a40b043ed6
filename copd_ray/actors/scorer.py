"""ScorerActor: a branch as a live teacher: token log-probs under its current weights."""

from __future__ import annotations

import time

import ray
import torch

from copd_ray.actors.engine_host import EngineHost
from copd_ray.engines import Scores


@ray.remote
class ScorerActor(EngineHost):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Read through info(): the HTTP tests check that refused requests never got here.
        self.score_calls = 0

    def score(self, sequences: list, prompt_lengths: list[int], top_k: int = 0) -> Scores:
        """Token ids, or VisualInputs plus response tokens (hf and vllm engines)."""
        self.score_calls += 1
        start = time.perf_counter()
        scores = self.engine.score(sequences, prompt_lengths, top_k)
        scores.extra["seconds"] = time.perf_counter() - start
        return scores

    def info(self) -> dict:
        return {"branch": self.branch, "version": self.engine.version, "vocab_size": self.engine.vocab_size,
                "score_calls": self.score_calls}

    def distributions(self, sequences: list[list[int]], prompt_lengths: list[int]) -> list[torch.Tensor]:
        """Full-vocabulary log-probs at each response position (for overlap and KL metrics)."""
        if not hasattr(self.engine, "response_logprob_rows"):
            raise NotImplementedError(f"a {type(self.engine).__name__} cannot return full distributions")
        with torch.inference_mode():
            rows = self.engine.response_logprob_rows(sequences, prompt_lengths)
        return [r.cpu() for r in rows]
