"""Rollout engines behind one interface: pure torch (`hf`) here; vLLM and SGLang on GPUs."""

from copd_ray.engines.base import RolloutEngine, Sample, SamplingParams, Scores
from copd_ray.engines.hf import HFEngine

__all__ = ["HFEngine", "RolloutEngine", "Sample", "SamplingParams", "Scores"]
