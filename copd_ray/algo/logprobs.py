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


def _chunk_logprobs(head: Callable, hidden: torch.Tensor, targets: torch.Tensor, banned: tuple[int, ...],
                    temperature: torch.Tensor | None = None, own: bool = False):
    logits = head(hidden).float()
    if banned:
        logits = logits.index_fill(-1, torch.tensor(banned, device=logits.device), BANNED)
    own_lp = None
    if temperature is not None:
        if own:  # the untempered log-probs, before the logits are divided
            with torch.no_grad():
                own_lp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        logits = logits / temperature.unsqueeze(-1)
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if own and own_lp is None:  # untempered: the log-probs themselves
        own_lp = lp.detach()
    return lp, logp, own_lp


def chosen_logprobs(head: Callable, hidden: torch.Tensor, targets: torch.Tensor, chunk: int,
                    banned: tuple[int, ...] = (), entropy: bool = False, temperature: torch.Tensor | None = None,
                    own: bool = False):
    """(log p(target) [N], entropy [N] or None, own [N] or None) for hidden states [N, H]
    and targets [N].

    `head` maps hidden states to logits (a causal LM's output layer). `temperature` [N]
    divides each position's logits first: the log-probs (and entropy) of the distribution
    the token was sampled from, as verl, OpenRLHF and TRL train on. `own`: also the model's
    own log-probs (temperature 1), detached, which is what the engines return. Entropy is a
    metric: it never carries a gradient.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    grad = torch.is_grad_enabled() and hidden.requires_grad

    def piece(h, t, tau):
        lp, logp, own_lp = _chunk_logprobs(head, h, t, banned, tau, own)
        if not entropy:
            return lp, None, own_lp
        with torch.no_grad():
            return lp, -(logp.exp() * logp).sum(-1), own_lp

    out, ent, owns = [], [], []
    for lo in range(0, hidden.shape[0], chunk):
        h, t = hidden[lo : lo + chunk], targets[lo : lo + chunk]
        tau = temperature[lo : lo + chunk] if temperature is not None else None
        lp, e, o = checkpoint(piece, h, t, tau, use_reentrant=False) if grad else piece(h, t, tau)
        out.append(lp)
        ent.append(e)
        owns.append(o)
    if not out:  # no positions: keep the graph connected to hidden for backward
        empty = hidden.sum(-1).float() * 0.0
        return empty, (empty.detach() if entropy else None), (empty.detach() if own else None)
    return torch.cat(out), (torch.cat(ent) if entropy else None), (torch.cat(owns) if own else None)
