"""The pure-torch rollout engine: batched sampling with a KV cache on any causal LM,
including Qwen-VL style vision-language models (prompts given as `VisualInputs`).

The laptop fallback and the reference the other engines are tested against.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence

import torch

from copd_ray.engines.base import RolloutEngine, Sample, SamplingParams, Scores, check_score_request
from copd_ray.models.vl_inputs import ban_tokens, collate, token_ids, vision_token_ids


def _pick_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class HFEngine(RolloutEngine):
    def __init__(
        self,
        model: torch.nn.Module,
        eos_token_id: int,
        pad_token_id: int,
        max_batch_size: int = 256,
        version: int = 0,
    ) -> None:
        self.model = model.eval()
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.version = version
        self.banned = vision_token_ids(model.config)
        # transformers >= 5.2x names the KV cache `cache`; earlier releases `past_key_values`.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def _step(self, cache=None, **inputs):
        """One forward that returns (last-position logits, the grown KV cache)."""
        if cache is not None:
            inputs[self._cache_arg] = cache
        out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        return ban_tokens(out.logits[:, -1], self.banned), getattr(out, self._cache_arg)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    # -- generation -------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Sample]:
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        expanded = [(i, p) for i, p in enumerate(prompts) for _ in range(params.n)]
        samples: list[Sample] = []
        for start in range(0, len(expanded), self.max_batch_size):
            samples += self._generate_batch(expanded[start : start + self.max_batch_size], params, generator)
        return samples

    def _positions(self, ids, mask, extra) -> torch.Tensor:
        """Position ids of a left-padded prompt batch: 0, 1, ... over the real tokens, or for a
        vision-language model its own multimodal (M-RoPE) positions, [3, B, W]."""
        if not extra:
            return (mask.cumsum(dim=1) - 1).clamp(min=0)
        rope = {k: v for k, v in extra.items() if k in ("image_grid_thw", "video_grid_thw", "mm_token_type_ids")}
        return self.model.model.get_rope_index(ids, attention_mask=mask, **rope)[0]

    def _generate_batch(self, batch, params: SamplingParams, generator) -> list[Sample]:
        device = self.device
        stop_ids = torch.tensor([self.eos_token_id, *params.stop_token_ids], device=device)
        # Each prompt is read once, however many samples it has (as vLLM's prefix cache does):
        # its KV cache is then copied to each sample's row. Left padding keeps every row's
        # next token in the last column.
        first: dict[int, int] = {}
        rows_of = torch.tensor([first.setdefault(i, len(first)) for i, _ in batch], device=device)
        prompts = {i: p for i, p in batch}
        ids, mask, extra = collate([prompts[i] for i in first], self.pad_token_id, left=True, device=device)
        positions = self._positions(ids, mask, extra)

        logits, cache = self._step(input_ids=ids, attention_mask=mask, position_ids=positions, **extra)
        # Each new token takes the next position (in every M-RoPE axis: text runs on all three).
        next_pos = positions.amax(dim=-1) + 1 if extra else positions[:, -1] + 1
        if len(first) < len(batch):
            cache.batch_select_indices(rows_of)
            logits, mask, next_pos = logits[rows_of], mask[rows_of], next_pos[..., rows_of]

        rows = len(batch)
        tokens = torch.full((rows, params.max_new_tokens), self.pad_token_id, dtype=torch.long, device=device)
        logps = torch.zeros(rows, params.max_new_tokens, device=device)
        k = params.top_k_logprobs
        topk_ids = torch.zeros(rows, params.max_new_tokens, k, dtype=torch.long, device=device)
        topk_lps = torch.zeros(rows, params.max_new_tokens, k, device=device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        lengths = torch.full((rows,), params.max_new_tokens, dtype=torch.long, device=device)

        for step in range(params.max_new_tokens):
            logp_all = torch.log_softmax(logits.float(), dim=-1)
            chosen = _pick_tokens(logits, params, generator)
            chosen = torch.where(done, self.pad_token_id, chosen)
            tokens[:, step] = chosen
            logps[:, step] = logp_all.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
            if k:
                top = logp_all.topk(k, dim=-1)
                topk_ids[:, step], topk_lps[:, step] = top.indices, top.values
            stopped = ~done & torch.isin(chosen, stop_ids)
            lengths = torch.where(stopped, step + 1, lengths)
            done |= stopped
            if done.all() or step + 1 == params.max_new_tokens:
                break
            mask = torch.cat([mask, (~done).long().unsqueeze(1)], dim=1)
            logits, cache = self._step(
                cache, input_ids=chosen.unsqueeze(1), attention_mask=mask, position_ids=next_pos.unsqueeze(-1)
            )
            next_pos = next_pos + 1

        tokens, logps, lengths = tokens.tolist(), logps.tolist(), lengths.tolist()
        if k:
            topk_ids, topk_lps = topk_ids.tolist(), topk_lps.tolist()
        stopped_rows = done.tolist()
        samples = []
        for row, (prompt_index, _) in enumerate(batch):
            n = lengths[row]
            samples.append(Sample(
                prompt_index=prompt_index,
                token_ids=tokens[row][:n],
                logprobs=logps[row][:n],
                finish_reason="stop" if stopped_rows[row] else "length",
                top_k_ids=topk_ids[row][:n] if k else None,
                top_k_logprobs=topk_lps[row][:n] if k else None,
            ))
        return samples

    # -- teacher-forced scoring -----------------------------------------------------------

    @torch.inference_mode()
    def score(self, sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int], top_k: int = 0) -> Scores:
        check_score_request(sequences, prompt_lengths, self.vocab_size)
        logprobs: list[list[float]] = []
        top_ids: list[list[list[int]]] = []
        top_lps: list[list[list[float]]] = []
        for start in range(0, len(sequences), self.max_batch_size):
            chunk = sequences[start : start + self.max_batch_size]
            plens = prompt_lengths[start : start + self.max_batch_size]
            logp_rows = self.response_logprob_rows(chunk, plens)
            for seq, p, rows in zip(chunk, plens, logp_rows):
                targets = torch.tensor(token_ids(seq)[p:], dtype=torch.long, device=rows.device)
                logprobs.append(rows.gather(-1, targets.unsqueeze(-1)).squeeze(-1).tolist())
                if top_k:
                    top = rows.topk(min(top_k, rows.shape[-1]), dim=-1)
                    top_ids.append(top.indices.tolist())
                    top_lps.append(top.values.tolist())
        return Scores(
            logprobs=logprobs, version=self.version,
            top_k_ids=top_ids if top_k else None, top_k_logprobs=top_lps if top_k else None,
        )

    def response_logprob_rows(self, sequences, prompt_lengths) -> list[torch.Tensor]:
        """Full-vocabulary log-probs [len - p, V] at each response position of each sequence."""
        # Right padding: causal attention never lets a real token see the padding after it.
        ids, mask, extra = collate(sequences, self.pad_token_id, device=self.device)
        logits = ban_tokens(self.model(input_ids=ids, attention_mask=mask, **extra).logits.float(), self.banned)
        logp = torch.log_softmax(logits, dim=-1)
        # The token at position t is predicted by the logits at t - 1.
        return [logp[row, p - 1 : len(seq) - 1] for row, (seq, p) in enumerate(zip(sequences, prompt_lengths))]

    # -- weights ------------------------------------------------------------------------

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        # state_dict() tensors share storage with the parameters, so copy_ updates in place
        # (and a tied embedding is written through either of its names).
        own = self.model.state_dict()
        written = set()  # a tied tensor arrives under each of its names: copy it once
        for name, tensor in named_tensors:
            if name not in own:
                raise KeyError(f"update_weights: the model has no tensor named {name!r}")
            if own[name].shape != tensor.shape:
                raise ValueError(f"update_weights: {name} has shape {tuple(own[name].shape)}, got {tuple(tensor.shape)}")
            key = (own[name].data_ptr(), tensor.data_ptr())
            if key not in written:
                own[name].copy_(tensor)
                written.add(key)
        self.version = version
