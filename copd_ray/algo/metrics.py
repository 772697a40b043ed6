"""Health signals between branches along the student's rollouts (paper Eq. 6) and entropy."""

from __future__ import annotations

import torch


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


@torch.no_grad()
def topk_overlap(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, mask: torch.Tensor
) -> torch.Tensor:
    """Mean over unmasked positions of |topk(student) & topk(teacher)| / k.

    Logits are [B, T, V]; mask is [B, T].
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError("student and teacher logits must have the same shape")
    k = min(k, student_logits.shape[-1])
    s_ids = student_logits.topk(k, dim=-1).indices  # [B, T, k]
    t_ids = teacher_logits.topk(k, dim=-1).indices
    # Top-k ids are distinct within a set, so counting pairwise matches counts the intersection.
    shared = (s_ids.unsqueeze(-1) == t_ids.unsqueeze(-2)).any(dim=-1).sum(dim=-1)
    return _masked_mean(shared.float() / k, mask)


@torch.no_grad()
def symmetric_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean over unmasked positions of KL(S||T) + KL(T||S) over the full vocabulary."""
    log_s = torch.log_softmax(student_logits.float(), dim=-1)
    log_t = torch.log_softmax(teacher_logits.float(), dim=-1)
    # KL(S||T) + KL(T||S) = sum (p_s - p_t)(log p_s - log p_t)
    per_pos = ((log_s.exp() - log_t.exp()) * (log_s - log_t)).sum(dim=-1)
    return _masked_mean(per_pos, mask)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the policy over unmasked positions."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return _masked_mean(-(logp.exp() * logp).sum(dim=-1), mask)
