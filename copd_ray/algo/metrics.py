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
    return _masked_mean(_shared_share(s_ids, t_ids), mask)


def _shared_share(s_ids: torch.Tensor, t_ids: torch.Tensor) -> torch.Tensor:
    """|s & t| / k at each position of two [B, T, k] top-k id sets. Top-k ids are distinct
    within a set, so counting pairwise matches counts the intersection."""
    return (s_ids.unsqueeze(-1) == t_ids.unsqueeze(-2)).any(dim=-1).sum(dim=-1).float() / s_ids.shape[-1]


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
def topk_pair_metrics(
    student_ids: torch.Tensor, student_logprobs: torch.Tensor, teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor, k: int, mask: torch.Tensor, eps: float = 1e-12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k overlap, symmetric KL) from each side's K most likely tokens only, [B, T, K]
    ids and log-probs sorted most likely first; mask [B, T]. What two scorers can compute
    by exchanging O(positions x K) numbers, on any engine (vLLM gives top-K log-probs).

    Overlap: |topk(S) & topk(T)| / k over the first k <= K entries, exactly `topk_overlap`.
    Symmetric KL: over the coarse distribution whose bins are the tokens in both top-K
    sets (there both probabilities are known) plus one bin for every other token (each
    side's remaining mass). Merging tokens into a bin never increases a KL, so this is a
    lower bound of the full-vocabulary value, equal to it when the top-K sets cover the
    support; the README says how far below it lies on the tiny policy.
    """
    if student_ids.shape != teacher_ids.shape:
        raise ValueError(f"student {tuple(student_ids.shape)} and teacher {tuple(teacher_ids.shape)} top-k differ")
    k = min(k, student_ids.shape[-1])
    overlap = _shared_share(student_ids[..., :k], teacher_ids[..., :k])

    match = student_ids.unsqueeze(-1) == teacher_ids.unsqueeze(-2)  # [B, T, K_s, K_t]
    shared = match.any(-1)  # student entries the teacher also ranks in its top K
    p_s = student_logprobs.float().exp() * shared
    # The teacher's probability of each shared student entry (0 where not shared).
    p_t = (match.float() * teacher_logprobs.float().exp().unsqueeze(-2)).sum(-1) * shared
    rest_s = (1.0 - p_s.sum(-1)).clamp(min=eps)
    rest_t = (1.0 - p_t.sum(-1)).clamp(min=eps)
    log_ratio = torch.where(shared, p_s.clamp(min=eps).log() - p_t.clamp(min=eps).log(), torch.zeros_like(p_s))
    per_pos = ((p_s - p_t) * log_ratio).sum(-1) + (rest_s - rest_t) * (rest_s.log() - rest_t.log())
    return _masked_mean(overlap, mask), _masked_mean(per_pos, mask)
