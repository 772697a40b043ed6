"""GeneratorActor: a branch's rollouts, rewarded by each prompt's verifier."""

from __future__ import annotations

import time

import ray

from copd_ray.actors.engine_host import EngineHost
from copd_ray.engines import SamplingParams
from copd_ray.rewards import get_reward
from copd_ray.step_data import PromptBatch, Rollouts, one_per_rank


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

    def sample(self, batch: PromptBatch, ranks: int = 1):
        """A step's rollouts of these prompts, packed, as one Rollouts per trainer rank (whole
        prompts' samples each, balanced by tokens; a single one for one rank): call it with
        `.options(num_returns=ranks)`. The teacher scorer and each rank get theirs by object
        reference, never through the driver."""
        out = self.rollout(batch.prompts, batch.params, batch.answers, batch.rewards)
        samples = out["samples"]
        rollouts = Rollouts.pack([batch.prompts[s.prompt_index] + s.token_ids for s in samples],
                                 [len(batch.prompts[s.prompt_index]) for s in samples], [s.logprobs for s in samples],
                                 out["rewards"], out["version"], self.policy_step, out["seconds"])
        return one_per_rank(rollouts.split(ranks, batch.params.n))

    def evaluate_folder(self, folder: str, cfg, held: dict) -> dict[str, float]:
        """Held-out pass@1 of a saved model folder (`runtime.evaluate_folder`'s job, on this
        warm engine): its weights are loaded over the branch's, so call it only once the
        branch is done training."""
        from copd_ray.evaluation import pass_rates
        from copd_ray.models.loading import runtime_state_dict
        from copd_ray.models.vl_inputs import VisionInputBuilder

        trust = cfg.model.trust_remote_code
        self.engine.update_weights(runtime_state_dict(folder, trust).items(), version=-1)
        return pass_rates(self.engine, self.tokenizer, held, cfg, VisionInputBuilder.for_folder(folder, trust))

    def pass_count(self, batch: PromptBatch) -> tuple[float, int]:
        """(sum of rewards, rollouts) of a greedy evaluation: two numbers back, not the samples."""
        rewards = self.rollout(batch.prompts, batch.params, batch.answers, batch.rewards)["rewards"]
        return sum(rewards), len(rewards)
