"""The policy's forward as training needs it: each response token's log-prob (and entropy)
on the shifted grid, its vocabulary projection taken a chunk of positions at a time, and
each distinct prompt read once where a group's samples share it."""

from __future__ import annotations

import torch
from torch import nn

from copd_ray.algo import chosen_logprobs
from copd_ray.batch import SharedPrompts


class PolicyLogprobs(nn.Module):
    """The policy's forward as training needs it: log-probs (and entropy) of the response
    tokens, laid out on the shifted [B, L-1] grid (zeros elsewhere). One module, so that
    FSDP2 gathers the root's parameters (output layer, embeddings) around all of it."""

    def __init__(self, policy: nn.Module, banned: tuple[int, ...], chunk: int) -> None:
        super().__init__()
        self.policy, self.banned, self.chunk = policy, banned, chunk

    def forward(self, ids, attention, targets, mask, extra: dict, shared: SharedPrompts | None = None,
                entropy: bool = False, temperature: torch.Tensor | None = None, own: bool = False):
        """(log-probs, entropy or None, own log-probs or None) on the grid; `temperature`
        [B] per row (see `chosen_logprobs`)."""
        backbone = getattr(self.policy, self.policy.base_model_prefix)
        if shared is not None:
            return self._on_shared_prompts(backbone, shared, mask.shape[1], entropy, temperature, own)
        hidden = backbone(input_ids=ids, attention_mask=attention, use_cache=False, **extra).last_hidden_state[:, :-1]
        where = mask > 0
        tau = temperature.unsqueeze(1).expand(where.shape)[where] if temperature is not None else None
        out = chosen_logprobs(self.policy.get_output_embeddings(), hidden[where], targets[where], self.chunk,
                              self.banned, entropy, tau, own)

        def grid(v):
            return torch.zeros(where.shape, dtype=v.dtype, device=v.device).masked_scatter(where, v)

        return tuple(grid(v) if v is not None else None for v in out)

    def _on_shared_prompts(self, backbone, shared: SharedPrompts, width: int, entropy: bool,
                           temperature: torch.Tensor | None, own: bool):
        """Each distinct prompt through the model once, then every row's response on a copy
        of its prompt's KV cache (gradients flow back through the copies into the prompt's
        one pass), as the engine samples them: the same log-probs for less compute."""
        rows, pmask = shared.rows_of, shared.prompt_mask
        prompt = backbone(input_ids=shared.prompt_ids, attention_mask=pmask,
                          position_ids=(pmask.cumsum(1) - 1).clamp(min=0), use_cache=True)
        cache = prompt.past_key_values
        cache.batch_select_indices(rows)
        r = shared.response_ids.shape[1]
        positions = pmask.sum(1)[rows].unsqueeze(1) + torch.arange(r, device=pmask.device)
        attention = torch.cat([pmask[rows], shared.response_mask], 1)
        response = backbone(input_ids=shared.response_ids, attention_mask=attention, position_ids=positions,
                            past_key_values=cache, use_cache=True).last_hidden_state
        # Response token t is predicted by the hidden state before it: the prompt's last for t = 0.
        hidden = torch.cat([prompt.last_hidden_state[rows, -1:], response[:, :-1]], 1)
        where = shared.response_mask > 0
        tau = temperature.unsqueeze(1).expand(where.shape)[where] if temperature is not None else None
        out = chosen_logprobs(self.policy.get_output_embeddings(), hidden[where], shared.response_ids[where],
                              self.chunk, self.banned, entropy, tau, own)
        # Onto the shifted [b, width] grid: response token t of row i sits at column offsets[i] + t.
        columns = shared.offsets.unsqueeze(1) + torch.arange(r, device=pmask.device)

        def grid(v):
            dense = torch.zeros(where.shape, dtype=v.dtype, device=v.device).masked_scatter(where, v)
            wide = torch.zeros(len(rows), width + r, dtype=v.dtype, device=v.device)
            return wide.scatter(1, columns, dense)[:, :width]

        return tuple(grid(v) if v is not None else None for v in out)


@torch.no_grad()
def check_output_layer(forward: PolicyLogprobs) -> None:
    """The chunked pass takes logits to be the output layer applied to the last hidden
    state, as in Llama and Qwen models; a model that scales or caps its logits would
    train on other numbers than it samples from, so it is refused here."""
    policy = forward.policy
    ids = torch.tensor([[1, 2, 3]], device=policy.device) % policy.config.get_text_config().vocab_size
    backbone = getattr(policy, policy.base_model_prefix)
    direct = policy(input_ids=ids).logits.float()
    via_head = policy.get_output_embeddings()(backbone(input_ids=ids).last_hidden_state).float()
    if not torch.allclose(direct, via_head, atol=1e-4, rtol=1e-4):
        raise ValueError(f"{type(policy).__name__}: its logits are not its output layer applied to the last hidden "
                         "state (scaled or capped logits), which the trainer's chunked log-probs assume")
