"""The algorithm core of CoPD: pure torch, no Ray.

GRPO advantages and loss, the OPD token signal, branch-health metrics and merging.
"""

from copd_ray.algo.logprobs import chosen_logprobs
from copd_ray.algo.grpo import clip_fraction, grpo_advantages, kl_k3, policy_loss, truncated_is_weight
from copd_ray.algo.merge import merge_state_dicts
from copd_ray.algo.metrics import symmetric_kl, topk_overlap, topk_pair_metrics
from copd_ray.algo.opd import opd_advantages

__all__ = [
    "chosen_logprobs",
    "clip_fraction",
    "grpo_advantages",
    "kl_k3",
    "merge_state_dicts",
    "opd_advantages",
    "policy_loss",
    "symmetric_kl",
    "topk_overlap",
    "topk_pair_metrics",
    "truncated_is_weight",
]
