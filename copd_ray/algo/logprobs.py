"""Log-probs of chosen tokens without the whole batch's [B, T, V] float32 logits.

Only the positions that are asked for are projected to the vocabulary, `chunk` of them
at a time; with gradients on, each chunk is recomputed in the backward pass
(activation checkpointing), so at most one chunk's logits exist at any moment.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

BANNED = -1e9  # the logit of a token a response may not hold (a vision placeholder)


def _chunk_logprobs(head: Callable, hidden: torch.Tensor, targets: torch.Tensor, banned: tuple[int, ...]):
    logits = head(hidden).float()
    if banned:
        logits = logits.index_fill(-1, torch.tensor(banned, device=logits.device), BANNED)
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), logp


def chosen_logprobs(head: Callable, hidden: torch.Tensor, targets: torch.Tensor, chunk: int,
                    banned: tuple[int, ...] = (), entropy: bool = False):
    """(log p(target) [N], entropy [N] or None) for hidden states [N, H] and targets [N].

    `head` maps hidden states to logits (a causal LM's output layer). Entropy is a metric:
    it never carries a gradient.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    grad = torch.is_grad_enabled() and hidden.requires_grad

    def piece(h, t):
        lp, logp = _chunk_logprobs(head, h, t, banned)
        if not entropy:
            return lp, None
        with torch.no_grad():
            return lp, -(logp.exp() * logp).sum(-1)

    out, ent = [], []
    for lo in range(0, hidden.shape[0], chunk):
        h, t = hidden[lo : lo + chunk], targets[lo : lo + chunk]
        lp, e = checkpoint(piece, h, t, use_reentrant=False) if grad else piece(h, t)
        out.append(lp)
        ent.append(e)
    if not out:  # no positions: keep the graph connected to hidden for backward
        empty = hidden.sum(-1).float() * 0.0
        return empty, (empty.detach() if entropy else None)
    return torch.cat(out), (torch.cat(ent) if entropy else None)
