"""Parameter-space merging of the branches into one model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

MERGE_METHODS = ("mean", "task_arithmetic")


def _check_same_layout(state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> None:
    first = state_dicts[0]
    for i, sd in enumerate(state_dicts[1:], start=1):
        if sd.keys() != first.keys():
            missing = sorted(set(first) ^ set(sd))[:5]
            raise ValueError(f"state dict {i} has different keys from state dict 0, e.g. {missing}")
        for name, tensor in sd.items():
            if tensor.shape != first[name].shape:
                raise ValueError(
                    f"{name}: shape {tuple(tensor.shape)} in state dict {i} "
                    f"!= {tuple(first[name].shape)} in state dict 0"
                )


def merge_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
    base: Mapping[str, torch.Tensor] | None = None,
    method: str = "mean",
) -> dict[str, torch.Tensor]:
    """Merge K state dicts of one architecture.

    "mean": sum_k w_k theta_k / sum_k w_k (uniform when weights is None).
    "task_arithmetic": base + sum_k w_k (theta_k - base), weights as given (default 1/K).
    Sums run in float32 and are cast back to each tensor's dtype; non-float tensors
    (integer buffers) are taken from the first state dict.
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {MERGE_METHODS}")
    if not state_dicts:
        raise ValueError("merge needs at least one state dict")
    k = len(state_dicts)
    if weights is None:
        weights = [1.0 / k] * k
    if len(weights) != k:
        raise ValueError(f"{len(weights)} merge weights for {k} state dicts")
    _check_same_layout(state_dicts)
    if method == "mean" and sum(weights) == 0:
        raise ValueError("merge weights sum to zero")
    if method == "task_arithmetic":
        if base is None:
            raise ValueError("task_arithmetic merging needs the base state dict")
        _check_same_layout([state_dicts[0], base])

    merged = {}
    for name, first in state_dicts[0].items():
        if not first.is_floating_point():
            merged[name] = first.clone()
            continue
        if method == "mean":
            total = sum(w * sd[name].float() for w, sd in zip(weights, state_dicts))
            out = total / sum(weights)
        else:
            theta0 = base[name].float()
            out = theta0 + sum(w * (sd[name].float() - theta0) for w, sd in zip(weights, state_dicts))
        merged[name] = out.to(first.dtype)
    return merged
