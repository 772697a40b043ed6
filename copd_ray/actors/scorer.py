"""ScorerActor: a branch as a live teacher: token log-probs under its current weights."""

from __future__ import annotations

import time

import ray
import torch

from copd_ray.actors.engine_host import EngineHost
from copd_ray.algo import topk_pair_metrics
from copd_ray.engines import Scores
from copd_ray.step_data import Rollouts, TeacherScores, TopK, one_per_rank


# Live HTTP scoring (Serve calls `score` and `info`) runs on a thread of its own, so that it never
# queues behind the training calls (score_rollouts, top_k, weight receives) on the actor's main one.
@ray.remote(concurrency_groups={"http": 1})
class ScorerActor(EngineHost):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Read through info(): the HTTP tests check that refused requests never got here.
        self.score_calls = 0

    @ray.method(concurrency_group="http")
    def score(self, sequences: list, prompt_lengths: list[int], top_k: int = 0) -> Scores:
        """Token ids, or VisualInputs plus response tokens (hf and vllm engines)."""
        start = time.perf_counter()
        with self.gate.reading():
            self.score_calls += 1
            scores = self.engine.score(sequences, prompt_lengths, top_k)
        scores.extra["seconds"] = time.perf_counter() - start
        return scores

    def score_rollouts(self, ranks: int, *parts: Rollouts):
        """A student's rollouts (the generators' shares for `ranks` trainer ranks, by
        reference, generator-major) scored as teacher: one TeacherScores per rank, aligned
        with that rank's shares (call it with `.options(num_returns=ranks)`)."""
        rollouts = Rollouts.concat(list(parts))
        scores = self.score(rollouts.sequences(), rollouts.prompt_lengths.tolist())
        return one_per_rank(TeacherScores.of(scores).cut(list(parts), ranks))

    @ray.method(concurrency_group="http")
    def info(self) -> dict:
        return {"branch": self.branch, "version": self.engine.version, "vocab_size": self.engine.vocab_size,
                "score_calls": self.score_calls}

    def top_k(self, k: int, *parts: Rollouts) -> TopK:
        """This policy's k most likely tokens at every response position of the rollouts."""
        rollouts = Rollouts.concat(list(parts))
        k = min(k, self.engine.vocab_size)
        with self.gate.reading():
            scores = self.engine.score(rollouts.sequences(), rollouts.prompt_lengths.tolist(), top_k=k)
        if scores.top_k_ids is None:
            raise NotImplementedError(f"a {type(self.engine).__name__} does not return top-k log-probs")
        width = max(len(r) for r in scores.top_k_ids)
        ids = torch.zeros(len(scores.top_k_ids), width, k, dtype=torch.long)
        lps = torch.full((len(scores.top_k_ids), width, k), -torch.inf)
        mask = torch.zeros(len(scores.top_k_ids), width)
        for i, (row_ids, row_lps) in enumerate(zip(scores.top_k_ids, scores.top_k_logprobs)):
            if row_ids:
                ids[i, : len(row_ids)] = torch.tensor(row_ids)
                lps[i, : len(row_lps)] = torch.tensor(row_lps, dtype=torch.float32)
                mask[i, : len(row_ids)] = 1.0
        return TopK(ids, lps, mask)

    def pair_metrics(self, teacher: TopK, k: int, *parts: Rollouts) -> dict[str, float]:
        """Top-k overlap and symmetric KL between this policy (the student) and a teacher,
        from the teacher's top-k along the same rollouts: O(positions x k) numbers cross
        between the scorers, no full-vocabulary row."""
        own = self.top_k(teacher.ids.shape[-1], *parts)
        overlap, kl = topk_pair_metrics(own.ids, own.logprobs, teacher.ids, teacher.logprobs, k, own.mask)
        return {"topk_overlap": overlap.item(), "symmetric_kl": kl.item()}

    def distributions(self, sequences: list[list[int]], prompt_lengths: list[int]) -> list[torch.Tensor]:
        """Full-vocabulary log-probs at each response position (exact metrics in tests and benchmarks)."""
        if not hasattr(self.engine, "response_logprob_rows"):
            raise NotImplementedError(f"a {type(self.engine).__name__} cannot return full distributions")
        with torch.inference_mode(), self.gate.reading():
            rows = self.engine.response_logprob_rows(sequences, prompt_lengths)
        return [r.cpu() for r in rows]
