"""Policies: loading checkpoints, the embedded tiny policy and its warm-up."""

from copd_ray.models.loading import load_policy
from copd_ray.models.tiny import build_char_tokenizer, build_tiny_policy, save_policy

__all__ = ["build_char_tokenizer", "build_tiny_policy", "load_policy", "save_policy"]
