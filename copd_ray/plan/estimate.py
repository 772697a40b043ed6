"""One actor's peak memory, part by part, for a workload (the step's shape)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path


from copd_ray.config import Config
from copd_ray.plan.architecture import Architecture
from copd_ray.plan.constants import (
    ACT_BYTES, ADAM_BYTES, BACKWARD_WORKING_BLOCKS, CKPT_INPUT_BYTES, CPU_ADAM_TEMP_COPIES, CPU_RUNTIME_BYTES,
    DEFAULT_PROMPT_TOKENS, END_ROOT_GRAD_COPIES, FOREACH_ADAM_TEMP_BYTES, GPU_ALLOCATOR_MARGIN,
    GPU_RUNTIME_BYTES, GRAD_BYTES, GiB, HF_FORWARD_WIDTHS, HF_SAMPLER_FLOAT32_COPIES,
    HF_SCORER_LOGIT_FLOAT32_COPIES, LOGPROB_FLOAT32_COPIES, MASK_BYTES, MASTER_BYTES,
    NO_GRAD_LOGPROB_FLOAT32_COPIES, NO_GRAD_WORKING_BLOCKS, OUTSIDE_HIDDEN_COPIES, VLLM_ACT_WIDTHS,
    VLLM_BATCHED_TOKENS_BIG_GPU, VLLM_BATCHED_TOKENS_OTHER, VLLM_CUDA_GRAPH_BYTES, VLLM_NON_TORCH_BYTES,
    VLLM_PROMPT_LOGPROB_FLOAT32_COPIES, VLLM_SAMPLER_FLOAT32_COPIES
)


# -- the workload --------------------------------------------------------------------------------


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Workload:
    """What one branch's step puts on its actors."""

    prompt_tokens: int
    response_tokens: int
    rows: int  # training rows a step (the larger phase)
    gen_rows: int  # rollouts one generator samples in one call (the larger phase)
    score_rows: int  # rows one score call of this branch's scorer holds

    @property
    def seq(self) -> int:
        return self.prompt_tokens + self.response_tokens


def _teachers(cfg: Config) -> dict[str, list[str]]:
    topo = cfg.topology_graph()
    return {n: topo.teachers_of(n) for n in topo.branches}


def _model_folder(cfg: Config) -> Path | None:
    """The model's folder when it is on this machine (a GGUF file's once imported)."""
    if cfg.model.gguf is not None:
        from copd_ray.models.gguf import DONE, imported_folder

        folder = imported_folder(cfg.model.gguf, cfg.cache_dir)
        return folder if (folder / DONE).exists() else None
    if cfg.model.path is not None and (Path(cfg.model.path).expanduser() / "config.json").exists():
        return Path(cfg.model.path).expanduser()
    return None


def measured_prompt_tokens(cfg: Config, samples: int = 64) -> int | None:
    """The longest prompt, in the model's own tokens (chat template and system prompt
    included), among `samples` held-out and `samples` training prompts of each capability;
    None where the model's tokenizer or the data is not on this machine."""
    from transformers import AutoTokenizer

    from copd_ray.capabilities import build_capability
    from copd_ray.data import encode_prompt

    folder = _model_folder(cfg)
    if folder is None:
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)
        longest = 0
        for c in cfg.capabilities:
            cap = build_capability(c, cfg.seed)
            for record in cap.heldout[:samples] + cap.sample(samples):
                if record.images or record.videos:
                    return None  # a picture's tokens depend on the processor: not measured here
                longest = max(longest, len(encode_prompt(record, tokenizer, cap.template)))
    except (OSError, ValueError):  # a dataset or tokenizer that cannot be read: the length is assumed instead
        return None
    return longest or None


def _prompt_tokens(cfg: Config, arch: Architecture, given: int | None) -> tuple[int, str]:
    new = cfg.grpo.max_new_tokens
    if given is not None:
        return given, "--prompt-tokens"
    measured = measured_prompt_tokens(cfg)
    if measured is not None:
        return measured, "the longest of the data's prompts, measured with the model's tokenizer"
    if cfg.engine.vllm.max_model_len:
        return max(1, cfg.engine.vllm.max_model_len - new), "engine.vllm.max_model_len - grpo.max_new_tokens"
    cap = arch.max_positions - new if arch.max_positions > new else DEFAULT_PROMPT_TOKENS
    return min(DEFAULT_PROMPT_TOKENS, cap), "assumed; --prompt-tokens sets it"


def _workload(cfg: Config, teachers: list[str], students: int, prompt_tokens: int) -> Workload:
    g, o, r = cfg.grpo, cfg.opd, cfg.resources
    native = g.prompts_per_step * g.group_size
    cross = o.prompts_per_teacher * o.samples_per_prompt
    phase2 = cfg.schedule.opd_steps > 0 and bool(teachers)
    # Phase I: the native batch; Phase II: the native batch (unless opd.native_rl=false) and
    # one cross-branch batch a teacher (a branch without teachers runs plain RLVR).
    phase1_rows = native if cfg.schedule.rl_steps or (cfg.schedule.opd_steps and not teachers) else 0
    phase2_rows = (native if o.native_rl else 0) + len(teachers) * cross if phase2 else 0
    rows = max(phase1_rows, phase2_rows)
    # A generator samples its share of the native prompts (group_size each), or of one
    # teacher's prompts (samples_per_prompt each), in batches of engine.max_batch_size (hf).
    gen = max(math.ceil(native / r.num_generators), math.ceil(cross / r.num_generators) if phase2 else 0)
    # A scorer scores one student's cross-branch rollouts a call, or the pair metrics' probe.
    score = max(cross if students else 0, cfg.metrics.pair_sequences if cfg.metrics.pair_every and students else 0, 1)
    return Workload(prompt_tokens, g.max_new_tokens, max(rows, 1), gen, score)


# -- one actor's memory --------------------------------------------------------------------------


def _act_mode(cfg: Config, num_trainers: int) -> str:
    if cfg.model.dtype == "float32":
        return "float32"
    return "sharded" if num_trainers > 1 else "autocast"


def block_activation_bytes(arch: Architecture, mode: str, masked: bool = False) -> float:
    """Bytes a token that one transformer block saves for backward (no checkpointing)."""
    a = ACT_BYTES[mode]
    q, kv = a["q"] + (a["qk_norm_q"] if arch.qk_norm else 0), a["kv"] + (a["qk_norm_kv"] if arch.qk_norm else 0)
    total = a["hidden"] * arch.hidden + q * arch.q_width + kv * arch.kv_width + a["mlp"] * arch.intermediate
    if masked and arch.kv_heads < arch.heads:  # SDPA with a mask: key/value repeated to the query heads
        total += 2 * (arch.q_width - arch.kv_width) * (4 if mode == "float32" else 2)
    return total


@dataclass(frozen=True)
class TrainerKnobs:
    num_trainers: int
    checkpointing: bool
    max_tokens: int | None
    chunk: int
    gpus: float


def _trainer_knobs(cfg: Config) -> TrainerKnobs:
    t, r = cfg.train, cfg.resources
    return TrainerKnobs(r.num_trainers, t.gradient_checkpointing, t.max_tokens_per_microbatch, t.logprob_chunk_tokens,
                        r.trainer_gpus)


def micro_batch(cfg: Config, w: Workload, num_trainers: int, max_tokens: int | None) -> tuple[int, int]:
    """(rows, rows in one micro-batch) of one trainer rank's minibatch; a row is never split."""
    per_rank = math.ceil(w.rows / num_trainers)
    per_minibatch = math.ceil(per_rank / cfg.grpo.minibatches)
    rows = per_minibatch if max_tokens is None else max(1, min(per_minibatch, max_tokens // w.seq))
    return per_minibatch, rows


def trainer_parts(cfg: Config, arch: Architecture, w: Workload, k: TrainerKnobs, on_gpu: bool) -> tuple[dict, str]:
    """A trainer rank's peak, part by part (that of its largest phase, `trainer_phases`), and
    what its micro-batch is and where the peak falls."""
    phases, detail = trainer_phases(cfg, arch, w, k, on_gpu)
    peak = max(phases, key=lambda name: sum(phases[name].values()))
    parts = dict(phases[peak], kv_cache=0)
    runtime = GPU_RUNTIME_BYTES if on_gpu else CPU_RUNTIME_BYTES
    margin = GPU_ALLOCATOR_MARGIN * sum(parts.values()) if on_gpu else 0
    parts["other"] = int(runtime + margin)
    return parts, f"{detail}; peak: {peak}"


def trainer_phases(cfg: Config, arch: Architecture, w: Workload, k: TrainerKnobs,
                   on_gpu: bool) -> tuple[dict[str, dict], str]:
    """A trainer rank's memory at each of the four places a step can peak, part by part
    (weights, grads, optimizer, activations, logprobs; the process itself not included):
    - "backward": the start of a micro-batch's backward, when every saved activation, the
      log-prob chunk and the output layer's gradient exist. Gradients of earlier micro-batches
      exist only when a minibatch takes several (the learner sets them to None first).
    - "backward's end": the end of a micro-batch's backward: every gradient plus the
      embedding's and output layer's gradient buffers (END_ROOT_GRAD_COPIES).
    - "old log-probs": the no-gradient pass over the rank's rows with entropy, while the
      previous step's gradients still exist.
    - "optimizer step": AdamW's temporaries.
    """
    c = DTYPE_BYTES[cfg.model.dtype]
    n, p = k.num_trainers, arch.params
    mode = _act_mode(cfg, n)
    shard = math.ceil(p / n)
    state_grads, adam = shard * GRAD_BYTES, shard * ADAM_BYTES
    master = shard * MASTER_BYTES + (p * c if n == 1 and c != 4 else 0)  # + autocast's model.dtype copies
    reference = p * c if cfg.grpo.kl_coef > 0 else 0
    if n > 1:  # FSDP2: ~2 blocks and the root unsharded in model.dtype, and their unsharded gradients
        gathered = c * (2 * arch.block_params + arch.root_params)
        gathered_grads, root_gathered = gathered, c * arch.root_params
        how = f"FSDP2 over {n} ranks"
    else:  # the output layer's float32 gradient (a tied one is held until the embedding's arrives)
        gathered, gathered_grads, root_gathered = 0, arch.root_params * GRAD_BYTES, 0
        how = "one rank"
    per_minibatch, rows = micro_batch(cfg, w, n, k.max_tokens)
    accumulating = rows < per_minibatch
    tokens = rows * w.seq
    masked = rows > 1
    block = block_activation_bytes(arch, mode, masked)
    outside = OUTSIDE_HIDDEN_COPIES * arch.hidden * (4 if mode != "sharded" else c)
    if k.checkpointing:
        acts = tokens * (arch.layers * arch.hidden * CKPT_INPUT_BYTES[mode] + (1 + BACKWARD_WORKING_BLOCKS) * block)
    else:
        acts = tokens * (arch.layers + BACKWARD_WORKING_BLOCKS) * block
    acts += tokens * outside + (rows * w.seq * w.seq * MASK_BYTES if masked else 0)
    chunk = min(k.chunk, rows * w.response_tokens)
    lm_head_copy = c if c != 4 else 0  # the lm_head's output in model.dtype before its float32 copy
    logprobs = chunk * arch.vocab * (LOGPROB_FLOAT32_COPIES * 4 + lm_head_copy)

    # The old (and reference) log-probs: micro-batch by micro-batch over all of the rank's rows.
    per_rank = math.ceil(w.rows / n)
    rows_ng = per_rank if k.max_tokens is None else max(1, min(per_rank, k.max_tokens // w.seq))
    chunk_ng = min(k.chunk, rows_ng * w.response_tokens)
    acts_ng = rows_ng * w.seq * (NO_GRAD_WORKING_BLOCKS * block_activation_bytes(arch, mode, rows_ng > 1) + outside)
    acts_ng += rows_ng * w.seq * w.seq * MASK_BYTES if rows_ng > 1 else 0
    logprobs_ng = chunk_ng * arch.vocab * (NO_GRAD_LOGPROB_FLOAT32_COPIES * 4 + lm_head_copy)

    # The embedding's gradient buffers; the rest of the root (an untied output layer, the final
    # norm, a vision tower) has one float32 gradient of its own at that moment.
    end_root_grads = int(4 * (END_ROOT_GRAD_COPIES * arch.embed_params + arch.root_params - arch.embed_params))
    if on_gpu:  # foreach AdamW: a float32 sqrt of exp_avg_sq for every parameter at once
        optimizer_temp = shard * FOREACH_ADAM_TEMP_BYTES
    else:  # one parameter at a time: temporaries of the largest (the embedding or the output layer)
        optimizer_temp = CPU_ADAM_TEMP_COPIES * 4 * math.ceil(arch.vocab * arch.hidden / n)
    phases = {
        "backward": dict(weights=master + gathered + reference,
                         grads=(state_grads if accumulating else 0) + gathered_grads, optimizer=adam,
                         activations=acts, logprobs=logprobs),
        "backward's end": dict(weights=master + root_gathered + reference, grads=state_grads + end_root_grads,
                               optimizer=adam, activations=0, logprobs=0),
        "old log-probs": dict(weights=master + gathered + reference, grads=state_grads, optimizer=adam,
                              activations=acts_ng, logprobs=logprobs_ng),
        "optimizer step": dict(weights=master + reference, grads=state_grads, optimizer=adam + optimizer_temp,
                               activations=0, logprobs=0),
    }
    detail = (f"{how}; micro-batch {rows} x {w.seq:,} tokens of a {per_minibatch}-row minibatch, "
              f"checkpointing {'on' if k.checkpointing else 'off'}, log-prob chunk {chunk:,}"
              + ("; reference model" if reference else ""))
    return {name: {key: int(v) for key, v in parts.items()} for name, parts in phases.items()}, detail


def _vllm_batched_tokens(cfg: Config, gpu_bytes: int | None, gpu_name: str) -> int:
    v = cfg.engine.vllm
    if v.max_num_batched_tokens:
        return v.max_num_batched_tokens
    big = gpu_bytes is not None and gpu_bytes >= 70 * GiB and "A100" not in gpu_name
    default = VLLM_BATCHED_TOKENS_BIG_GPU if big else VLLM_BATCHED_TOKENS_OTHER
    return default if v.enable_chunked_prefill else max(default, v.max_model_len or 0)


def _widths(arch: Architecture, widths: dict) -> int:
    return (widths["hidden"] * arch.hidden + widths["q"] * arch.q_width + widths["kv"] * arch.kv_width
            + widths["mlp"] * arch.intermediate)


def vllm_parts(cfg: Config, arch: Architecture, w: Workload, scorer: bool, gpu_bytes: int | None, gpu_name: str,
               max_model_len: int | None = None) -> tuple[dict, int, str]:
    """(parts besides the KV cache, the KV cache vLLM must hold at least, detail)."""
    v, c = cfg.engine.vllm, DTYPE_BYTES[cfg.model.dtype]
    length = max_model_len or v.max_model_len or arch.max_positions or w.seq
    batched = _vllm_batched_tokens(cfg, gpu_bytes, gpu_name)
    act = batched * _widths(arch, VLLM_ACT_WIDTHS) * c
    act += min(v.max_num_seqs, batched) * arch.vocab * 4 * VLLM_SAMPLER_FLOAT32_COPIES
    logprobs = batched * arch.vocab * 4 * VLLM_PROMPT_LOGPROB_FLOAT32_COPIES if scorer else 0
    other = VLLM_NON_TORCH_BYTES + (0 if v.enforce_eager else VLLM_CUDA_GRAPH_BYTES)
    parts = dict(weights=arch.params * c, grads=0, optimizer=0, activations=int(act), logprobs=int(logprobs),
                 kv_cache=0, other=int(other))
    kv_min = length * arch.kv_bytes_per_token(c)
    return parts, kv_min, f"vLLM, max_model_len {length:,}, {batched:,} batched tokens"


def hf_engine_parts(cfg: Config, arch: Architecture, w: Workload, scorer: bool, on_gpu: bool,
                    max_batch_size: int | None = None) -> tuple[dict, str]:
    """The hf engine: a generator's KV cache for its batch, a scorer's full-vocabulary forward."""
    c = DTYPE_BYTES[cfg.model.dtype]
    b = max_batch_size or cfg.engine.max_batch_size
    runtime = GPU_RUNTIME_BYTES if on_gpu else CPU_RUNTIME_BYTES
    if scorer:
        rows = min(b, w.score_rows)
        tokens = rows * w.seq
        logits = tokens * arch.vocab * (c + 4 * HF_SCORER_LOGIT_FLOAT32_COPIES)
        if cfg.serve.enabled:  # an HTTP request pads to max_request_tokens
            logits = max(logits, cfg.serve.max_request_tokens * arch.vocab * (c + 4 * HF_SCORER_LOGIT_FLOAT32_COPIES))
        act = tokens * _widths(arch, HF_FORWARD_WIDTHS) * c + (rows * w.seq * w.seq * MASK_BYTES if rows > 1 else 0)
        parts = dict(weights=arch.params * c, grads=0, optimizer=0, activations=int(act), logprobs=int(logits),
                     kv_cache=0, other=int(runtime))
        return parts, f"hf scorer, {rows} x {w.seq:,} tokens a forward (full-vocabulary log-probs)"
    rows = min(b, w.gen_rows)
    kv = rows * w.seq * arch.kv_bytes_per_token(c)
    kv += kv / arch.layers  # the cache of one layer is copied as it grows
    prefill = rows * w.prompt_tokens * _widths(arch, HF_FORWARD_WIDTHS) * c + rows * w.prompt_tokens ** 2 * MASK_BYTES
    sampler = rows * arch.vocab * 4 * HF_SAMPLER_FLOAT32_COPIES
    parts = dict(weights=arch.params * c, grads=0, optimizer=0, activations=int(prefill), logprobs=int(sampler),
                 kv_cache=int(kv), other=int(runtime))
    return parts, f"hf generator, {rows} rows x {w.seq:,} tokens of KV cache"


