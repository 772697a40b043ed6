"""On-policy distillation: the per-token teacher signal (paper Eq. 8)."""

from __future__ import annotations

import torch


def opd_advantages(
    teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, beta: float | torch.Tensor
) -> torch.Tensor:
    """beta * (log pi_T(y_t) - log pi_S(y_t)) per token, detached. `beta` is a number, or
    one per row ([B, 1]: each row's teacher edge's, as a batch of several teachers has).

    It is a per-token reverse-KL reward: the student is pushed toward tokens the teacher
    rates higher than it does. It carries no gradient; the gradient flows only through
    the policy ratio of the clipped loss.
    """
    if teacher_logprobs.shape != student_logprobs.shape:
        raise ValueError(
            f"teacher {tuple(teacher_logprobs.shape)} and student "
            f"{tuple(student_logprobs.shape)} log-probs differ in shape"
        )
    return (beta * (teacher_logprobs - student_logprobs)).detach()
