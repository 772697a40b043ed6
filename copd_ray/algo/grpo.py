"""GRPO: group-normalised advantages and the clipped policy-gradient loss (paper Eq. 7)."""

from __future__ import annotations

import torch

AGGREGATIONS = ("seq_mean_token_mean", "token_mean")


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(r - group mean) / (group std + eps) over consecutive groups of `group_size`.

    The std is the unbiased one (torch's default, as in DeepSeekMath/verl); a group whose
    rewards are all equal gives zeros, so it contributes no gradient.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.float().view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    return ((groups - mean) / (std + eps)).view(-1)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): exp(d) - d - 1 with d = ref - logp. Always >= 0."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1.0


@torch.no_grad()
def truncated_is_weight(old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """min(pi_old / pi_behaviour, cap) per token (TIS): corrects a loss on rollouts that
    another policy sampled (an older version, or an engine with other numerics) toward the
    trainer's policy at the start of the step, with the weight capped so that a token the
    behaviour policy found unlikely cannot dominate the update."""
    if cap <= 0:
        raise ValueError(f"the importance-weight cap must be > 0, got {cap}")
    return torch.exp(old_logprobs - behaviour_logprobs).clamp(max=cap)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: str, denominator: float | None = None) -> torch.Tensor:
    """Reduce a [B, T] per-token quantity over the unmasked tokens.

    `denominator`: when these rows are one part of a larger batch (a micro-batch, or a
    data-parallel rank's share), the whole batch's token count (token_mean) or sequence
    count (seq_mean_token_mean); the parts' results then add up to the whole's.
    """
    mask = mask.to(per_token.dtype)
    if agg == "seq_mean_token_mean":
        per_seq = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return per_seq.mean() if denominator is None else per_seq.sum() / denominator
    if agg == "token_mean":
        return (per_token * mask).sum() / (mask.sum().clamp(min=1.0) if denominator is None else denominator)
    raise ValueError(f"unknown loss aggregation {agg!r}; choose one of {AGGREGATIONS}")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    agg: str = "seq_mean_token_mean",
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    denominator: float | None = None,
    is_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Negated clipped surrogate, aggregated over unmasked tokens (`denominator`: see `aggregate`).

    All inputs are [B, T]; `advantages` may also be [B] (one per sequence, as GRPO gives).
    With `kl_coef > 0` and `ref_logprobs`, adds the k3 KL penalty to a reference policy
    (Eq. 12's beta term); it is off by default, as in DAPO-style recipes. `is_weight` [B, T]
    (`truncated_is_weight`) multiplies the surrogate of each token, not the KL term.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1).expand_as(logprobs)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if is_weight is not None:
        per_token = per_token * is_weight
    if kl_coef:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs")
        per_token = per_token + kl_coef * kl_k3(logprobs, ref_logprobs)
    return aggregate(per_token, mask, agg, denominator)


@torch.no_grad()
def clip_fraction(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor,
    clip_low: float = 0.2, clip_high: float = 0.28,
) -> torch.Tensor:
    """Share of unmasked tokens whose ratio lies outside [1 - clip_low, 1 + clip_high]."""
    ratio = torch.exp(logprobs - old_logprobs)
    outside = ((ratio < 1.0 - clip_low) | (ratio > 1.0 + clip_high)).to(logprobs.dtype)
    return aggregate(outside, mask, "token_mean")
