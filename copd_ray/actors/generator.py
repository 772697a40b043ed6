"""GeneratorActor: a branch's rollouts, rewarded by each prompt's verifier."""

from __future__ import annotations

import time

import ray

from copd_ray.actors.engine_host import EngineHost
from copd_ray.engines import SamplingParams
from copd_ray.rewards import get_reward


@ray.remote
class GeneratorActor(EngineHost):
    def rollout(self, prompts: list, params: SamplingParams,
                answers: list[str] | None = None, rewards: list[str] | None = None) -> dict:
        """`params.n` samples per prompt (token ids, or VisualInputs for the hf and vllm
        engines); with answers and reward names, each sample's reward."""
        start = time.perf_counter()
        samples = self.engine.generate(prompts, params)
        out = {"samples": samples, "version": self.engine.version}
        if answers is not None:
            texts = self.tokenizer.batch_decode([s.token_ids for s in samples], skip_special_tokens=True)
            out["rewards"] = [
                get_reward(rewards[s.prompt_index])(text, answers[s.prompt_index]) for s, text in zip(samples, texts)
            ]
        out["seconds"] = time.perf_counter() - start
        return out
