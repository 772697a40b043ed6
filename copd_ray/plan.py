"""`copd-ray plan`: what fits, before anything starts.

For every actor of every branch (trainer ranks, generators, and a scorer where some branch
asks it for log-probs; a frozen branch is its scorer alone) an estimate of its peak memory,
part by part, against what its placement-group bundle has: `resources.*_gpus` x the GPU
memory of the node type (`cluster.yaml`'s InstanceType, through `INSTANCE_TYPES`, or
`--gpu-memory-gb`). A CPU-only config is checked against host memory instead.

Nothing is loaded but the model's `config.json` (through `transformers.AutoConfig`): no
weights, no Ray. The parameter count is exact for the families the project runs (Llama,
Mistral, Qwen2, Qwen3, Qwen2-VL, Qwen3-VL; tests/test_plan.py checks it against models
transformers builds) and read off a model built on the meta device for any other.

Every constant of the estimate lives in the block below, each with where it comes from.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from copd_ray.config import Config
from copd_ray.errors import CopdError
from copd_ray.topology.graph import scoring_branches

GiB = 2**30

# ---------------------------------------------------------------------------------------
# The estimate's constants, in one place.
#
# Measured here (tests/test_plan.py has the model; the numbers are peak RSS deltas on this
# machine's CPU, float32, one process per point, MALLOC_MMAP_THRESHOLD_=65536 so that
# freed tensors leave RSS): a 100M-parameter Qwen3 (hidden 768, 12 layers, 12 query / 4
# key-value heads of 64, MLP 2048, vocabulary 32,000, tied), one row, forward + backward
# of the decoder stack (gradients allocated beforehand):
#   tokens      256     1024     2048
#   plain     220 MB   827 MB  1644 MB   -> 797 KB a token (66 KB a token a block)
#   ckpt      111 MB   137 MB   259 MB   -> 122 KB a token (at 256 tokens the embedding's
#                                           dense gradient, 98 MB, is the peak)
#   + logits, log-softmax and their backward at vocabulary 32,000: +367 MB at 1024 tokens
# The traced per-block bytes below give 70.7 KB a token a block for that model (6% above
# the measured 66 KB: kept, the plan errs on the safe side) and 121.7 KB a token with
# checkpointing (36.9 KB of block inputs + 1.2 blocks), the measured 122 KB.
# Whole steps of a hand-written loop (same model, one rank, float32; old log-probs, forward
# + backward with log-probs in chunks, AdamW; the second step's peak RSS), measured against
# this plan's estimate (CPU_RUNTIME_BYTES included):
#   1024 + 1024 tokens, chunk 512:   plain 3.77 GiB vs 3.57 (-5%)   ckpt 2.29 vs 2.40 (+5%)
#    256 +  768 tokens, chunk 1024:  plain 2.98 GiB vs 2.82 (-5%)   ckpt 2.24 vs 2.44 (+9%)
# (That loop zeroed its gradients in place, so they existed during backward; the learner sets
# them to None, which the estimate below follows: -5% there is the gradients it kept.)
# Whole Learner.train_step's (copd_ray/learner.py) with 1 and 2 ranks (FSDP2 over gloo),
# checkpointing off and on, 1 and 4 micro-batches: benchmarks/trainer_memory.py prints each
# beside this estimate (the README quotes its table). A sampler thread's peak RSS in each
# phase of the second step (same model, 8 rows of 128 tokens, float32; MiB over the RSS before
# the model loaded; "backward" covers its start and its end; benchmarks/trainer_memory.py --phases):
#                           state  backward  old log-probs  optimizer step
#   1 rank, plain, 1 mb      1527      2326           1858            1762
#   1 rank, ckpt, 4 mb       1527      1854           1644            1760
#   2 ranks, plain, 1 mb      764      1303           1065             899
#   2 ranks, ckpt, 4 mb       764      1207           1043             903
# ("state": parameters + gradients + AdamW state, counted tensor by tensor.) With one
# micro-batch the learner's gradients are None until backward, so activations and
# gradients do not add up; the other phases hold the whole state and something besides.
# Those four phases are trainer_parts' (its docstring); the constants measured there say so.
# Not yet measured: bf16 on GPUs, vLLM (see the README's plan section).
# ---------------------------------------------------------------------------------------

# Trainer state, bytes a parameter (copd_ray/learner.py: weights loaded in float32, AdamW).
MASTER_BYTES = 4  # float32 master weights
GRAD_BYTES = 4  # float32 gradients (FSDP2: MixedPrecisionPolicy(reduce_dtype=float32))
ADAM_BYTES = 8  # AdamW exp_avg and exp_avg_sq, float32

# Activations saved for backward, bytes a token inside one transformer block, per unit of
# width: hidden (h), query width (heads x head_dim), key-value width (kv_heads x head_dim),
# MLP width (intermediate). Traced from the saved tensors of a HF Llama/Qwen block under
# autograd (SDPA attention, SwiGLU MLP, RMSNorm that upcasts to float32):
#   hidden: block input, RMSNorm's normalised copy and its output (x2 norms); under autocast
#           the residual stream stays float32 and each projection saves its own bf16 cast of
#           its input (q, k, v: 3 copies; gate, up: 2); FSDP2 params in bf16: residual in
#           bf16, each RMSNorm saves a float32 copy of its input.
#   q: the rotated query (SDPA input), SDPA's output and o_proj's contiguous input copy.
#   kv: rotated key and value (SDPA inputs).
#   mlp: gate, SiLU(gate), up and their product (down_proj's input).
#   qk_norm (Qwen3): q_norm / k_norm keep their float32 input and normalised output.
# "float32": model.dtype float32; "autocast": one rank, bf16/fp16 forwards over float32
# weights; "sharded": FSDP2 ranks whose params are cast to model.dtype.
ACT_BYTES = {
    "float32": dict(hidden=24, q=12, kv=8, mlp=16, qk_norm_q=8, qk_norm_kv=8),
    "autocast": dict(hidden=26, q=6, kv=4, mlp=8, qk_norm_q=6, qk_norm_kv=6),
    "sharded": dict(hidden=20, q=6, kv=4, mlp=8, qk_norm_q=6, qk_norm_kv=6),
}
# With gradient checkpointing a block keeps only its input (the residual stream: float32
# under autocast, model.dtype on FSDP2 ranks) and one block is recomputed at a time.
CKPT_INPUT_BYTES = {"float32": 4, "autocast": 4, "sharded": 2}
# The backward pass's working set (gradients of one block's activations), in blocks:
# measured, 121.7 KB a token = 12 x 3.07 KB (inputs) + (1 + 0.2) x 70.7 KB.
BACKWARD_WORKING_BLOCKS = 0.2
# Outside the blocks: embedding output, final norm (input, normalised copy, output) and the
# response positions' hidden states: hidden-sized copies a token.
OUTSIDE_HIDDEN_COPIES = 5
# Padded multi-row micro-batches: HF's SDPA path builds a [rows, 1, T, T] boolean mask
# (1 byte an entry) and, with a mask, repeats key/value heads to the query's count.
MASK_BYTES = 1

# The end of a micro-batch's backward: float32 buffers the size of the embedding besides the
# gradients: the (tied) output layer's gradient held until the embedding's arrives, the
# embedding's dense gradient, their sum, FSDP2's reduce-scatter input. Measured with
# benchmarks/trainer_memory.py --phases (checkpointing, 4 micro-batches, where activations
# are small): 3.5 x the embedding's 94 MiB above parameters + gradients + AdamW state with 1
# rank; with 2, 3.7 x besides the gathered root (its last block's gathered weights, 24 MiB,
# are likely the difference).
END_ROOT_GRAD_COPIES = 3.5
# The old log-probs (no gradients): one block's working set of the decoder, then a chunk's
# float32 logits, log-softmax, exp and their product (entropy): measured 3.55 [chunk, V]
# copies above the state with 1 rank (3.4 with 2, less the gathered root), so 4.
NO_GRAD_WORKING_BLOCKS = 1
NO_GRAD_LOGPROB_FLOAT32_COPIES = 4
# AdamW's step. On GPUs torch uses its foreach implementation, whose
# `torch._foreach_sqrt(exp_avg_sqs)` (torch/optim/adam.py, _multi_tensor_adam) is a float32
# copy of every parameter's second moment at once; on CPU it goes a parameter at a time, and
# the temporaries of the largest (the embedding) were measured: 2.5 x its float32 size.
FOREACH_ADAM_TEMP_BYTES = 4
CPU_ADAM_TEMP_COPIES = 2.5

# Log-probs of the chosen tokens, `train.logprob_chunk_tokens` positions at a time,
# recomputed in backward: vocabulary-wide float32 logits, their log-softmax and the
# gradient (measured: 2.8 float32 [T, V] tensors at 1024 x 32,000, so 3 x 4 bytes), plus
# the lm_head's output in model.dtype when that is not float32.
LOGPROB_FLOAT32_COPIES = 3

# A process's own memory besides its tensors.
GPU_RUNTIME_BYTES = 1.0 * GiB  # CUDA context (~0.5 GiB), cuBLAS workspace, NCCL buffers
CPU_RUNTIME_BYTES = 0.5 * GiB  # python + torch + transformers: 0.41 GiB RSS measured here; a Ray worker ~0.1
# The CUDA caching allocator's fragmentation on top of a training step's peak.
GPU_ALLOCATOR_MARGIN = 0.10

# vLLM (engine.kind=vllm). It takes gpu_memory_utilization x the GPU's memory and fills
# what its weights, its profiling forward and its non-torch memory leave with KV cache.
VLLM_NON_TORCH_BYTES = 1.5 * GiB  # CUDA context, NCCL, sampler buffers outside torch's allocator
VLLM_CUDA_GRAPH_BYTES = 1.0 * GiB  # CUDA graphs when engine.vllm.enforce_eager=false
# The profiling forward over max_num_batched_tokens tokens, bytes a token per width unit in
# model.dtype: residual, norm output, attention output, o_proj output (4 h), q and its
# output (2 q), k, v (2 kv), fused gate_up and the activated product (3 I).
VLLM_ACT_WIDTHS = dict(hidden=4, q=2, kv=2, mlp=3)
# vLLM 0.32's default max_num_batched_tokens (vllm/engine/arg_utils.py, LLM class): 16384 on
# GPUs of >= 70 GiB other than A100s, else 8192; without chunked prefill at least max_model_len.
VLLM_BATCHED_TOKENS_BIG_GPU = 16384
VLLM_BATCHED_TOKENS_OTHER = 8192
VLLM_SAMPLER_FLOAT32_COPIES = 2  # float32 logits and probabilities of max_num_seqs rows
VLLM_PROMPT_LOGPROB_FLOAT32_COPIES = 2  # a scorer's prompt log-probs over a scheduled chunk

# The hf engine (engine.kind=hf): a scorer holds [rows, T, V] logits in model.dtype, their
# float32 copy and the float32 log-softmax (copd_ray/engines/hf.py response_logprob_rows).
HF_SCORER_LOGIT_FLOAT32_COPIES = 2
# The no-grad forward's working set, bytes a token per width unit in model.dtype (one block live).
HF_FORWARD_WIDTHS = dict(hidden=4, q=2, kv=2, mlp=3)
# Last-position sampling: float32 logits, probabilities and the sorted copy for top-p.
HF_SAMPLER_FLOAT32_COPIES = 3

# Prompt tokens assumed when engine.vllm.max_model_len does not bound them (--prompt-tokens).
DEFAULT_PROMPT_TOKENS = 256


@dataclass(frozen=True)
class InstanceType:
    gpus: int
    gpu: str  # "" for none
    gpu_gib: float  # what the driver reports (nvidia-smi's total), GiB
    host_gib: float


def _family(gpu: str, gib: float, sizes: dict[str, tuple[int, int]]) -> dict[str, InstanceType]:
    return {name: InstanceType(n, gpu, gib, host) for name, (n, host) in sizes.items()}


# AWS instance types: GPUs, the GPU (memory as the driver reports it) and host memory
# (aws.amazon.com/ec2/instance-types). Extend as needed; an unknown type needs --gpu-memory-gb.
INSTANCE_TYPES: dict[str, InstanceType] = {
    **_family("H100 80GB", 79.6, {"p5.48xlarge": (8, 2048), "p5.4xlarge": (1, 256)}),
    **_family("H200 141GB", 140.4, {"p5e.48xlarge": (8, 2048), "p5en.48xlarge": (8, 2048)}),
    **_family("A100 40GB", 39.6, {"p4d.24xlarge": (8, 1152)}),
    **_family("A100 80GB", 79.3, {"p4de.24xlarge": (8, 1152)}),
    **_family("A10G 24GB", 22.5, {
        "g5.xlarge": (1, 16), "g5.2xlarge": (1, 32), "g5.4xlarge": (1, 64), "g5.8xlarge": (1, 128),
        "g5.16xlarge": (1, 256), "g5.12xlarge": (4, 192), "g5.24xlarge": (4, 384), "g5.48xlarge": (8, 768)}),
    **_family("L40S 48GB", 45.0, {
        "g6e.xlarge": (1, 32), "g6e.2xlarge": (1, 64), "g6e.4xlarge": (1, 128), "g6e.8xlarge": (1, 256),
        "g6e.16xlarge": (1, 512), "g6e.12xlarge": (4, 384), "g6e.24xlarge": (4, 768), "g6e.48xlarge": (8, 1536)}),
    **_family("L4 24GB", 22.5, {
        "g6.xlarge": (1, 16), "g6.2xlarge": (1, 32), "g6.4xlarge": (1, 64), "g6.8xlarge": (1, 128),
        "g6.16xlarge": (1, 256), "g6.12xlarge": (4, 192), "g6.24xlarge": (4, 384), "g6.48xlarge": (8, 768)}),
    **_family("V100 16GB", 16.0, {"p3.2xlarge": (1, 61), "p3.8xlarge": (4, 244), "p3.16xlarge": (8, 488)}),
    **_family("T4 16GB", 15.0, {"g4dn.xlarge": (1, 16), "g4dn.2xlarge": (1, 32), "g4dn.12xlarge": (4, 192)}),
    **_family("", 0.0, {
        "m6i.2xlarge": (0, 32), "m6i.4xlarge": (0, 64), "m6i.8xlarge": (0, 128), "m6i.16xlarge": (0, 256),
        "m5.2xlarge": (0, 32), "m5.4xlarge": (0, 64), "m5.8xlarge": (0, 128),
        "r6i.4xlarge": (0, 128), "r6i.8xlarge": (0, 256), "c6i.8xlarge": (0, 64)}),
}

# Where the architecture of a model that is not on this machine comes from (model.path of
# the paper configs names the cluster's storage): config.json-only descriptions shipped here.
KNOWN_ARCHITECTURES = {
    "qwen3-vl-4b": Path(__file__).resolve().parent.parent / "configs" / "models" / "qwen3-vl-4b",
}


class PlanError(CopdError, ValueError):
    pass


# -- the model's architecture ---------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    source: str  # where the numbers came from, said in the output
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qk_norm: bool
    max_positions: int
    embed_params: int
    lm_head_params: int  # 0 when tied to the embedding
    final_norm_params: int
    block_params: int  # one transformer block
    vision_params: int  # the vision tower and its mergers, 0 for a text model
    counted_on_meta: bool = False  # an unknown family: counted on a meta-device model

    @property
    def params(self) -> int:
        return self.root_params + self.layers * self.block_params

    @property
    def root_params(self) -> int:
        """What FSDP2's root unit holds: everything outside the transformer blocks."""
        return self.embed_params + self.lm_head_params + self.final_norm_params + self.vision_params

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV cache of one token: keys and values of every layer."""
        return 2 * self.layers * self.kv_width * dtype_bytes


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _vision_params(config: Any) -> int | None:
    """The vision tower's parameters for the Qwen-VL towers, None for another tower."""
    v = getattr(config, "vision_config", None)
    if v is None:
        return 0
    kind = getattr(config, "model_type", "")
    if kind in ("qwen2_vl",):
        ed, out, sms = v.embed_dim, v.hidden_size, v.spatial_merge_size
        mlp = int(ed * v.mlp_ratio)
        patch = v.in_channels * v.temporal_patch_size * v.patch_size**2 * ed
        block = (4 * ed + _linear(ed, 3 * ed, True) + _linear(ed, ed, True) + _linear(ed, mlp, True)
                 + _linear(mlp, ed, True))
        merged = ed * sms**2
        merger = 2 * ed + _linear(merged, merged, True) + _linear(merged, out, True)
        return patch + v.depth * block + merger
    if kind in ("qwen3_vl",):
        hv, iv, out, sms = v.hidden_size, v.intermediate_size, v.out_hidden_size, v.spatial_merge_size
        patch = v.in_channels * v.temporal_patch_size * v.patch_size**2 * hv + hv
        pos = v.num_position_embeddings * hv
        block = (4 * hv + _linear(hv, 3 * hv, True) + _linear(hv, hv, True) + _linear(hv, iv, True)
                 + _linear(iv, hv, True))
        merged = hv * sms**2
        mergers = _linear(merged, merged, True) + _linear(merged, out, True)
        deepstack = len(v.deepstack_visual_indexes) * (2 * merged + mergers)
        return patch + pos + v.depth * block + 2 * hv + mergers + deepstack
    return None


# Text families whose blocks are counted in closed form: (q/k/v bias, o bias, MLP bias, q/k norm)
def _text_family(text: Any) -> tuple[bool, bool, bool, bool] | None:
    kind = getattr(text, "model_type", "")
    attention_bias = bool(getattr(text, "attention_bias", False))
    if kind in ("llama", "mistral"):
        return attention_bias, attention_bias, bool(getattr(text, "mlp_bias", False)), False
    if kind in ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text"):
        return True, False, False, False
    if kind in ("qwen3", "qwen3_vl_text"):
        return attention_bias, attention_bias, False, True
    return None


def architecture_from_hf(config: Any, source: str) -> Architecture:
    """The numbers the plan needs from a transformers config (a causal LM or a Qwen-VL)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h, layers, heads = text.hidden_size, text.num_hidden_layers, text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    # (GPT-2 style configs name the MLP width n_inner, None meaning 4 x hidden.)
    inter = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * h
    vocab = text.vocab_size
    tied = bool(getattr(config, "tie_word_embeddings", getattr(text, "tie_word_embeddings", False)))
    family, vision = _text_family(text), _vision_params(config)
    max_positions = int(getattr(text, "max_position_embeddings", 0) or 0)
    qk_norm = family[3] if family else "qwen3" in getattr(text, "model_type", "")
    if family is not None and vision is not None:
        qkv_bias, o_bias, mlp_bias, _ = family
        q, kv = heads * head_dim, kv_heads * head_dim
        block = (_linear(h, q, qkv_bias) + 2 * _linear(h, kv, qkv_bias) + _linear(q, h, o_bias)
                 + 2 * _linear(h, inter, mlp_bias) + _linear(inter, h, mlp_bias) + 2 * h
                 + (2 * head_dim if qk_norm else 0))
        return Architecture(source, text.model_type, h, layers, heads, kv_heads, head_dim, inter, vocab, tied, qk_norm,
                            max_positions, vocab * h, 0 if tied else vocab * h, h, block, vision)
    return _counted_on_meta(config, source, h, layers, heads, kv_heads, head_dim, inter, vocab, tied, qk_norm,
                            max_positions)


def _counted_on_meta(config, source, h, layers, heads, kv_heads, head_dim, inter, vocab, tied, qk_norm,
                     max_positions) -> Architecture:
    """Another family: the model built on the meta device (no memory), its parameters split
    into the blocks (the largest ModuleList of `layers` modules) and the rest."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = auto.from_config(config)
    except Exception as e:  # noqa: BLE001 - any failure here means the family is unknown
        raise PlanError(f"cannot count the parameters of a {getattr(config, 'model_type', '?')} model from {source}: "
                        f"{e}") from None
    total = sum(p.numel() for p in model.parameters())
    blocks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == layers]
    block = sum(p.numel() for p in blocks[0][0].parameters()) if blocks else 0
    embed = model.get_input_embeddings().weight.numel()
    head = 0 if tied else model.get_output_embeddings().weight.numel()
    rest = total - layers * block - embed - head
    return Architecture(source, getattr(config, "model_type", "?"), h, layers, heads, kv_heads, head_dim, inter, vocab,
                        tied, qk_norm, max_positions, embed, head, rest, block, 0, counted_on_meta=True)


def _tiny_config(cfg: Config):
    """The embedded tiny policy's config, exactly as `copd-ray bootstrap` builds it (the model is
    built on the meta device: no memory, no weights)."""
    import torch

    t = cfg.model.tiny
    with torch.random.fork_rng(), torch.device("meta"):
        if t.vision:
            from copd_ray.models.tiny_vl import build_tiny_vl_policy, build_vl_tokenizer

            model = build_tiny_vl_policy(build_vl_tokenizer(), t.hidden_size, t.num_layers, t.num_heads,
                                         t.intermediate_size, seed=t.seed)
        else:
            from copd_ray.models.tiny import build_char_tokenizer, build_tiny_policy

            model = build_tiny_policy(build_char_tokenizer(), t.hidden_size, t.num_layers, t.num_heads,
                                      t.intermediate_size, seed=t.seed)
    return model.config


def _known_architecture(path: str) -> Path | None:
    name = Path(path).name.lower()
    for key, folder in KNOWN_ARCHITECTURES.items():
        if name.startswith(key):
            return folder
    return None


def architecture(cfg: Config, model_config: str | Path | None = None) -> Architecture:
    """The architecture of the config's model: `model_config` (a folder with a config.json, or
    the file) if given; else model.path when it is on this machine; else a config.json-only
    description shipped in configs/models/ that matches model.path's name; else the embedded
    tiny policy when model.path and model.gguf are null."""
    from transformers import AutoConfig

    trust = cfg.model.trust_remote_code

    def read(where: Path, why: str) -> Architecture:
        folder = where.parent if where.is_file() else where
        if not (folder / "config.json").is_file():
            raise PlanError(f"{where} has no config.json")
        try:
            hf = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust)
        except (OSError, ValueError, KeyError) as e:
            raise PlanError(f"cannot read the model config in {folder}: {e}") from None
        return architecture_from_hf(hf, f"{folder / 'config.json'}{why}")

    if model_config is not None:
        return read(Path(model_config).expanduser(), " (--model-config)")
    if cfg.model.gguf is not None:
        from copd_ray.models.gguf import import_gguf

        return read(import_gguf(cfg.model.gguf, cfg.cache_dir), f" (imported from {cfg.model.gguf})")
    if cfg.model.path is None:
        return architecture_from_hf(_tiny_config(cfg), "the embedded tiny policy (model.tiny)")
    path = Path(cfg.model.path).expanduser()
    if path.exists():
        return read(path, "")
    shipped = _known_architecture(cfg.model.path)
    if shipped is not None:
        try:
            shown = shipped.relative_to(Path.cwd())
        except ValueError:
            shown = shipped
        return read(Path(shown), f" (model.path {cfg.model.path} is not on this machine)")
    raise PlanError(f"model.path {cfg.model.path} is not on this machine and no architecture is known for it: "
                    "give --model-config FOLDER (a folder with the model's config.json; no weights needed)")


# -- the cluster ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeType:
    name: str
    instance_type: str
    gpus: int | None  # None: an unknown instance type that cluster.yaml gives no GPU count
    gpu: str
    gpu_bytes: int | None  # None: unknown instance type
    host_bytes: int | None
    max_workers: int  # how many of it the cluster may run (1 for the head)
    head: bool


@dataclass(frozen=True)
class Cluster:
    source: str
    node_types: tuple[NodeType, ...]
    max_workers: int

    def gpu_capacity(self) -> int | None:
        """GPUs of the head plus the largest workers up to the cluster's max_workers (None: unknown)."""
        if any(n.gpus is None for n in self.node_types):
            return None
        head = sum(n.gpus for n in self.node_types if n.head)
        workers = sorted((n for n in self.node_types if not n.head), key=lambda n: -n.gpus)
        left, total = self.max_workers, head
        for n in workers:
            take = min(n.max_workers, left)
            total, left = total + take * n.gpus, left - take
        return total


def read_cluster(path: str | Path) -> Cluster:
    """The node types of a Ray cluster config (`ray up`'s YAML)."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise PlanError(f"cannot read the cluster config {path}: {e}") from None
    types = tree.get("available_node_types") or {}
    if not isinstance(types, dict) or not types:
        raise PlanError(f"{path} names no available_node_types")
    head_name = tree.get("head_node_type")
    nodes = []
    for name, spec in types.items():
        spec = spec or {}
        instance = str((spec.get("node_config") or {}).get("InstanceType", ""))
        known = INSTANCE_TYPES.get(instance)
        resources = spec.get("resources") or {}
        gpus = resources.get("GPU", known.gpus if known else None)
        gpus = None if gpus is None else int(gpus)
        head = name == head_name
        nodes.append(NodeType(
            name, instance, gpus, known.gpu if known else "",
            int(known.gpu_gib * GiB) if known and known.gpu_gib else None,
            int(known.host_gib * GiB) if known else None,
            1 if head else int(spec.get("max_workers", tree.get("max_workers", 0)) or 0), head))
    return Cluster(str(path), tuple(nodes), int(tree.get("max_workers", 0) or 0))


# -- the rows ------------------------------------------------------------------------------------


@dataclass
class ActorMemory:
    """One actor's estimated peak memory (bytes) against its bundle's."""

    branch: str
    actor: str  # "trainer 0", "generator 1", "scorer"
    role: str  # trainer | generator | scorer
    engine: str  # trainer: "fsdp2" / "plain"; generators and scorers: hf / vllm / sglang
    gpus: float  # the bundle's GPUs
    parts: dict[str, int]  # weights, grads, optimizer, activations, logprobs, kv_cache, other
    have: int | None  # the bundle's memory; None: cannot check
    where: str  # what `have` is: "1 x H100 80GB (worker.8xh100)", "host memory", ...
    detail: str = ""  # micro-batch, KV sequences, ...
    fix: list[str] = field(default_factory=list)  # dotted overrides, each of which fixes it alone

    @property
    def need(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        return None if self.have is None else self.need <= self.have


@dataclass
class Check:
    """A check that is not one actor's: GPUs asked against the cluster's, host memory."""

    what: str
    fits: bool | None
    message: str
    fix: list[str] = field(default_factory=list)


@dataclass
class MemoryPlan:
    arch: Architecture
    rows: list[ActorMemory]
    checks: list[Check]
    memory_source: str  # where the GPU (or host) memory numbers came from
    notes: list[str]

    @property
    def fits(self) -> bool:
        return all(r.fits is not False for r in self.rows) and all(c.fits is not False for c in self.checks)

    def problems(self) -> list[str]:
        """One line per actor (ranks with equal numbers together) or check that does not fit."""
        lines = []
        for group in _groups(self.rows):
            r = group[0]
            if r.fits is False:
                knobs = " or ".join(r.fix) if r.fix else "none of its settings is enough: a bigger GPU"
                lines.append(f"{r.branch} {_group_name(group)}: needs {_gib(r.need)} GiB, has "
                             f"{_gib(r.have)} GiB ({r.where}); fix: {knobs}")
        for c in self.checks:
            if c.fits is False:
                lines.append(f"{c.message}" + (f"; fix: {' or '.join(c.fix)}" if c.fix else ""))
        return lines


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


# -- the plan ------------------------------------------------------------------------------------


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _gib(b: int | float | None) -> str:
    return "-" if b is None else f"{b / GiB:.1f}"


def _with(cfg: Config, **dotted: Any) -> Config:
    """The config with dotted keys changed (`_with(cfg, **{"train.gradient_checkpointing": True})`)."""
    updates: dict = {}
    for key, value in dotted.items():
        section, name = key.split(".", 1)
        if "." in name:
            sub, leaf = name.split(".", 1)
            inner = getattr(getattr(cfg, section), sub).model_copy(update={leaf: value})
            updates.setdefault(section, {})[sub] = inner
        else:
            updates.setdefault(section, {})[name] = value
    return cfg.model_copy(update={s: getattr(cfg, s).model_copy(update=u) for s, u in updates.items()})


@dataclass(frozen=True)
class _Memory:
    gpu_bytes: int | None
    gpu_name: str
    where: str  # e.g. "H100 80GB on worker.8xh100"


def plan_memory(cfg: Config, cluster: str | Path | None = None, gpu_memory_gb: float | None = None,
                model_config: str | Path | None = None, prompt_tokens: int | None = None,
                host_memory_gb: float | None = None) -> MemoryPlan:
    """Every actor's estimated peak memory against its bundle. `cluster`: a Ray cluster YAML whose
    node types give the GPU (and host) memory; `gpu_memory_gb` (GiB a GPU) overrides it;
    `host_memory_gb` is the memory a CPU-only config is checked against (default: this
    machine's, or the cluster's nodes' when `cluster` is given)."""
    arch = architecture(cfg, model_config)
    vision = f" ({_count(arch.vision_params)} in the vision tower)" if arch.vision_params else ""
    notes = [f"model: {_count(arch.params)} parameters{vision}, {arch.layers} layers, hidden {arch.hidden}, "
             f"vocabulary {arch.vocab:,}; architecture from {arch.source}"]
    if arch.counted_on_meta:
        notes.append(f"a {arch.model_type} model: parameters counted on the meta device; activations assume a "
                     "Llama-style block")
    r = cfg.resources
    uses_gpus = r.trainer_gpus > 0 or r.generator_gpus > 0 or r.scorer_gpus > 0
    clus = read_cluster(cluster) if cluster is not None else None
    checks: list[Check] = []

    # Where the GPU memory comes from.
    if gpu_memory_gb is not None:
        mem = _Memory(int(gpu_memory_gb * GiB), f"{gpu_memory_gb:g} GiB GPU", f"{gpu_memory_gb:g} GiB GPU")
        memory_source = f"--gpu-memory-gb {gpu_memory_gb:g}"
    elif clus is not None and uses_gpus:
        gpu_types = [n for n in clus.node_types if n.gpus is None or n.gpus > 0]
        unknown = [n for n in gpu_types if n.gpu_bytes is None]
        if not gpu_types:
            mem = _Memory(None, "", "no GPU node type")
            memory_source = f"{clus.source}: no node type has GPUs"
            checks.append(Check("gpus", False, f"the config asks for GPUs and {clus.source} names no GPU node "
                                               "type", ["a GPU node type in available_node_types"]))
        elif unknown:
            mem = _Memory(None, "", f"unknown instance type {unknown[0].instance_type!r}")
            memory_source = (f"{clus.source}: instance type {unknown[0].instance_type!r} of {unknown[0].name} is not "
                             "in copd_ray.plan.INSTANCE_TYPES; give --gpu-memory-gb")
        else:
            # A GPU bundle may land on any node type with GPUs: the smallest GPU is what it can count on.
            small = min(gpu_types, key=lambda n: n.gpu_bytes)
            mem = _Memory(small.gpu_bytes, small.gpu, f"{small.gpu} on {small.name}")
            memory_source = f"{clus.source}: " + "; ".join(
                f"{n.name} {n.instance_type} {n.gpus} x {n.gpu} ({_gib(n.gpu_bytes)} GiB)" for n in gpu_types)
            if len({n.gpu_bytes for n in gpu_types}) > 1:
                notes.append(f"GPU bundles may land on any of {', '.join(n.name for n in gpu_types)}: checked against "
                             f"the smallest GPU ({small.gpu} on {small.name}); a node type's resources: {{GPU: 0}} "
                             "keeps bundles off it")
    elif uses_gpus:
        mem = _Memory(None, "", "GPU memory unknown")
        memory_source = "no cluster.yaml and no --gpu-memory-gb: GPU memory unknown"
    else:
        mem = _Memory(None, "", "")
        memory_source = ""

    teachers = _teachers(cfg)
    scoring = scoring_branches(cfg, [(t, s) for s, ts in teachers.items() for t in ts])
    students = {n: sum(n in t for t in teachers.values()) for n in teachers}
    prompt, prompt_why = _prompt_tokens(cfg, arch, prompt_tokens)
    notes.append(f"sequences: {prompt:,} prompt tokens ({prompt_why}) + {cfg.grpo.max_new_tokens:,} response tokens")
    if arch.vision_params:
        notes.append("vision-tower activations of image and video rows are not counted (their tokens are, as "
                     "prompt tokens)")

    rows: list[ActorMemory] = []
    for b in cfg.branch_list():
        w = _workload(cfg, teachers[b.name], students[b.name], prompt)
        if not b.frozen:
            for i in range(r.num_trainers):
                rows.append(_trainer_row(cfg, arch, w, b.name, i, mem))
            for i in range(r.num_generators):
                rows.append(_engine_row(cfg, arch, w, b.name, f"generator {i}", "generator", cfg.engine.kind,
                                        r.generator_gpus, mem))
        if b.name in scoring:
            kind = cfg.engine.scorer_kind or cfg.engine.kind
            rows.append(_engine_row(cfg, arch, w, b.name, "scorer", "scorer", kind, r.scorer_gpus, mem,
                                    receives=not b.frozen))

    if uses_gpus and clus is not None:
        checks.extend(_gpu_count_checks(cfg, clus))
    cpu_rows = [row for row in rows if row.gpus == 0]
    if cpu_rows:
        checks.append(_host_check(cfg, cpu_rows, clus, host_memory_gb))
        if not memory_source:
            memory_source = checks[-1].what
    return MemoryPlan(arch, rows, checks, memory_source, notes)


def _bundle_memory(gpus: float, mem: _Memory) -> tuple[int | None, str]:
    if mem.gpu_bytes is None:
        return None, mem.where or "GPU memory unknown"
    share = min(gpus, 1.0)  # an actor uses one device, whatever its bundle holds
    return int(share * mem.gpu_bytes), f"{gpus:g} x {mem.where}" + (" (an actor uses one)" if gpus > 1 else "")


def _trainer_row(cfg: Config, arch: Architecture, w: Workload, branch: str, i: int, mem: _Memory) -> ActorMemory:
    k = _trainer_knobs(cfg)
    on_gpu = k.gpus > 0
    parts, detail = trainer_parts(cfg, arch, w, k, on_gpu)
    have, where = _bundle_memory(k.gpus, mem) if on_gpu else (None, "host memory")
    row = ActorMemory(branch, f"trainer {i}", "trainer", "fsdp2" if k.num_trainers > 1 else "plain", k.gpus, parts,
                      have, where, detail)
    if row.fits is False:
        row.fix = _trainer_fixes(cfg, arch, w, k, have)
    return row


def _trainer_fixes(cfg: Config, arch: Architecture, w: Workload, k: TrainerKnobs, have: int) -> list[str]:
    """Settings that each alone make a trainer rank fit (then combinations, if none does)."""
    def fits(kk: TrainerKnobs) -> bool:
        return sum(trainer_parts(cfg, arch, w, kk, True)[0].values()) <= have

    fixes = []
    if not k.checkpointing and fits(_replace(k, checkpointing=True)):
        fixes.append("train.gradient_checkpointing=true")
    per_minibatch, rows = micro_batch(cfg, w, k.num_trainers, k.max_tokens)
    r = rows
    while r > 1:
        r //= 2
        if fits(_replace(k, max_tokens=r * w.seq)):
            fixes.append(f"train.max_tokens_per_microbatch={r * w.seq}")
            break
    chunk = k.chunk
    while chunk > 128:
        chunk //= 2
        if fits(_replace(k, chunk=chunk)):
            fixes.append(f"train.logprob_chunk_tokens={chunk}")
            break
    n = k.num_trainers
    for more in (2, 4, 8, 16, 32, 64):
        if more > n and fits(_replace(k, num_trainers=more)):
            fixes.append(f"resources.num_trainers={more}")
            break
    if k.gpus < 1 and fits(_replace(k, gpus=1.0)):
        fixes.append("resources.trainer_gpus=1")
    if fixes:
        return fixes
    # None alone: checkpointing, then fewer rows a micro-batch, a smaller log-prob chunk, more ranks.
    steps, kk = [], k
    if not kk.checkpointing:
        kk = _replace(kk, checkpointing=True)
        steps.append("train.gradient_checkpointing=true")
    if not fits(kk):
        r = rows
        while r > 1 and not fits(_replace(kk, max_tokens=r * w.seq)):
            r //= 2
        if r * w.seq != kk.max_tokens:
            kk = _replace(kk, max_tokens=r * w.seq)
            steps.append(f"train.max_tokens_per_microbatch={r * w.seq}")
    while not fits(kk) and kk.chunk > 256:
        kk = _replace(kk, chunk=kk.chunk // 2)
    if kk.chunk != k.chunk:
        steps.append(f"train.logprob_chunk_tokens={kk.chunk}")
    more = kk.num_trainers
    while not fits(kk) and more < 64:
        more *= 2
        kk = _replace(kk, num_trainers=more)
    if more != k.num_trainers:
        steps.append(f"resources.num_trainers={more}")
    return [" and ".join(steps)] if fits(kk) else []


def _replace(k: TrainerKnobs, **kw) -> TrainerKnobs:
    return TrainerKnobs(**{**k.__dict__, **kw})


def _engine_row(cfg: Config, arch: Architecture, w: Workload, branch: str, actor: str, role: str, kind: str,
                gpus: float, mem: _Memory, receives: bool = True) -> ActorMemory:
    on_gpu = gpus > 0
    scorer = role == "scorer"
    have, where = _bundle_memory(gpus, mem) if on_gpu else (None, "host memory")
    # On CPU a receiver keeps one buffer per bucket across syncs (actors/weight_sync.py): a
    # second copy of the weights in the wire dtype. A frozen teacher's scorer receives nothing.
    kept = arch.params * DTYPE_BYTES[cfg.model.dtype] if receives and not on_gpu else 0
    if kind in ("vllm", "sglang"):
        if on_gpu:
            return _vllm_row(cfg, arch, w, branch, actor, role, kind, gpus, mem, have, where)
        c = DTYPE_BYTES[cfg.model.dtype]
        kv = cfg.engine.vllm.kv_cache_memory_mb * 2**20 if kind == "vllm" else 0
        parts = dict(weights=arch.params * c, grads=0, optimizer=0, activations=0, logprobs=0, kv_cache=kv,
                     other=int(CPU_RUNTIME_BYTES + VLLM_NON_TORCH_BYTES + kept))
        return ActorMemory(branch, actor, role, kind, gpus, parts, None, where,
                           f"{kind} on CPU, KV cache engine.vllm.kv_cache_memory_mb"
                           + (", kept weight-receive buffers" if kept else ""))
    parts, detail = hf_engine_parts(cfg, arch, w, scorer, on_gpu)
    parts["other"] += int(kept)
    detail += ", kept weight-receive buffers" if kept else ""
    row = ActorMemory(branch, actor, role, kind, gpus, parts, have, where, detail)
    if row.fits is False:
        b = min(cfg.engine.max_batch_size, w.score_rows if scorer else w.gen_rows)
        while b > 1:
            b //= 2
            if sum(hf_engine_parts(cfg, arch, w, scorer, on_gpu, b)[0].values()) <= have:
                row.fix.append(f"engine.max_batch_size={b}")
                break
        if scorer and cfg.serve.enabled:
            row.fix.append("serve.max_request_tokens=<smaller>")
        row.fix.append(f"engine.{'scorer_kind' if scorer else 'kind'}=vllm")
        if gpus < 1:
            row.fix.append(f"resources.{role}_gpus=1")
    return row


def _vllm_row(cfg, arch, w, branch, actor, role, kind, gpus, mem, have, where) -> ActorMemory:
    """A vLLM (or SGLang) engine takes its utilisation share of the whole GPU and fills what its
    weights, profiling forward and non-torch memory leave with KV cache. It fits when that
    share is within its bundle's and holds the KV cache of one full-length sequence."""
    v, c = cfg.engine.vllm, DTYPE_BYTES[cfg.model.dtype]
    scorer = role == "scorer"
    util, knob = ((v.gpu_memory_utilization, "engine.vllm.gpu_memory_utilization") if kind == "vllm" else
                  (cfg.engine.sglang.mem_fraction_static, "engine.sglang.mem_fraction_static"))
    parts, kv_min, detail = vllm_parts(cfg, arch, w, scorer, mem.gpu_bytes, mem.gpu_name)
    if kind == "sglang":
        detail = detail.replace("vLLM", "SGLang (estimated like vLLM)")
    row = ActorMemory(branch, actor, role, kind, gpus, parts, have, where, detail)
    if mem.gpu_bytes is None:
        parts["kv_cache"] = kv_min
        return row
    budget, fixed = int(util * mem.gpu_bytes), sum(parts.values())
    kv = budget - fixed
    length = v.max_model_len or arch.max_positions or w.seq
    per_seq = length * arch.kv_bytes_per_token(c)
    row.detail = (f"{detail}; takes {util:g} of the GPU ({_gib(budget)} GiB): KV cache {_gib(max(kv, 0))} GiB = "
                  f"{max(kv, 0) / per_seq:.1f} sequences of {length:,} tokens (max_num_seqs {v.max_num_seqs})")
    share = min(gpus, 1.0)
    if kv >= kv_min:
        parts["kv_cache"] = kv  # what it takes is its whole budget
        if budget > have:  # more than its bundle's share of the GPU
            need_util = (fixed + kv_min) / mem.gpu_bytes
            if need_util <= share:
                row.fix.append(f"{knob}={math.floor(share * 100) / 100:g}")
            if gpus < 1:
                row.fix.append(f"resources.{role}_gpus={min(1.0, math.ceil(util * 100) / 100):g}")
        return row
    # Its budget holds no full-length sequence: vLLM refuses to start.
    parts["kv_cache"] = kv_min
    row.have, row.where = min(budget, have), f"{util:g} x {mem.where} ({knob})"
    need_util = (fixed + kv_min) / mem.gpu_bytes
    if need_util <= share:
        row.fix.append(f"{knob}={math.ceil(need_util * 100) / 100:g}")
    if kind == "vllm":
        fits_len = max(kv, 0) // arch.kv_bytes_per_token(c) // 1024 * 1024
        if fits_len > w.response_tokens:
            row.fix.append(f"engine.vllm.max_model_len={fits_len}")
    if gpus < 1 and need_util <= 1:
        row.fix.append(f"resources.{role}_gpus=1 and {knob}={math.ceil(need_util * 100) / 100:g}")
    if kind == "vllm" and v.enable_chunked_prefill:  # a smaller profiling forward (and prompt log-probs)
        batched = _vllm_batched_tokens(cfg, mem.gpu_bytes, mem.gpu_name) // 2
        while batched >= 1024:
            smaller = _with(cfg, **{"engine.vllm.max_num_batched_tokens": batched})
            p, _, _ = vllm_parts(smaller, arch, w, scorer, mem.gpu_bytes, mem.gpu_name)
            if sum(p.values()) + kv_min <= budget:
                row.fix.append(f"engine.vllm.max_num_batched_tokens={batched}")
                break
            batched //= 2
    return row


def _gpu_count_checks(cfg: Config, clus: Cluster) -> list[Check]:
    r = cfg.resources
    asked = 0.0
    biggest = 0.0
    for b in cfg.branch_list():
        bundles = [r.scorer_gpus] + ([] if b.frozen else [r.trainer_gpus] * r.num_trainers
                                     + [r.generator_gpus] * r.num_generators)
        asked += sum(bundles)
        biggest = max(biggest, *bundles)
    capacity = clus.gpu_capacity()
    if capacity is None:
        return [Check("gpus", None, f"GPUs: the branches' placement groups ask for {asked:g}; how many {clus.source} "
                                    "has is unknown (an instance type not in copd_ray.plan.INSTANCE_TYPES)")]
    largest_node = max((n.gpus for n in clus.node_types), default=0)
    checks = [Check("gpus", asked <= capacity,
                    f"GPUs: the branches' placement groups ask for {asked:g}; {clus.source} has up to {capacity} "
                    f"(max_workers {clus.max_workers})",
                    [] if asked <= capacity else ["a larger max_workers in cluster.yaml",
                                                  "fewer resources.num_trainers / num_generators"])]
    if biggest > largest_node:
        checks.append(Check("bundle", False, f"a bundle asks for {biggest:g} GPUs; no node type has more than "
                                             f"{largest_node}", ["resources.*_gpus <= a node's GPUs"]))
    return checks


def _host_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _host_check(cfg: Config, cpu_rows: list[ActorMemory], clus: Cluster | None, host_gb: float | None) -> Check:
    """CPU actors share their node's memory: all of them (a local Ray) or each branch's (PACK on a
    cluster node) against it, plus the driver process."""
    need = sum(r.need for r in cpu_rows) + CPU_RUNTIME_BYTES
    if host_gb is not None:
        have, where = int(host_gb * GiB), f"--host-memory-gb {host_gb:g}"
    elif clus is not None:
        sizes = [n.host_bytes for n in clus.node_types if n.host_bytes]
        if not sizes:
            return Check("host memory", None, f"CPU actors need {_gib(need)} GiB of host memory; the instance types "
                                              f"of {clus.source} are unknown: cannot check")
        branch_need = {}
        for r in cpu_rows:
            branch_need[r.branch] = branch_need.get(r.branch, 0) + r.need
        need = max(branch_need.values()) + CPU_RUNTIME_BYTES
        have, where = max(sizes), f"the largest node of {clus.source}"
    else:
        have, where = _host_bytes(), "this machine (a local Ray)"
    if have is None:
        return Check("host memory", None, f"CPU actors need {_gib(need)} GiB of host memory: cannot read this "
                                          "machine's memory; give --host-memory-gb")
    fits = need <= have
    for row in cpu_rows:
        row.where = f"host memory, shared ({where})"
    return Check(f"host memory of {where}", fits,
                 f"host memory: the CPU actors{' of the largest branch' if clus is not None else ''} and the driver "
                 f"need {_gib(need)} GiB of {_gib(have)} GiB ({where})",
                 [] if fits else ["resources.num_generators=1", "engine.max_batch_size=<smaller>",
                                  "train.max_tokens_per_microbatch=<smaller>"])


# -- the table -----------------------------------------------------------------------------------

TABLE_WIDTH = 110  # the table's natural width: printed whole even where the console is narrower
COLUMNS = ("weights", "grads", "optimizer", "activations", "logprobs", "kv_cache", "other")
HEADERS = ("weights", "grads", "optim", "activ", "logits", "KV", "other")


def _key(r: ActorMemory) -> tuple:
    return (r.branch, r.role, r.engine, r.gpus, tuple(r.parts.items()), r.have, r.detail, tuple(r.fix))


def _groups(rows: list[ActorMemory]) -> list[list[ActorMemory]]:
    """Consecutive rows of one branch and role with equal numbers, together."""
    groups: list[list[ActorMemory]] = []
    for r in rows:
        if groups and _key(groups[-1][0]) == _key(r):
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def _group_name(group: list[ActorMemory]) -> str:
    if len(group) == 1:
        return group[0].actor
    first, last = group[0].actor.rsplit(" ", 1), group[-1].actor.rsplit(" ", 1)
    return f"{first[0]}s {first[1]}-{last[1]}"


def table(plan: MemoryPlan, title: str = "estimated peak memory per actor, GiB"):
    from rich import box
    from rich.table import Table

    t = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    t.add_column("actor", no_wrap=True)
    t.add_column("GPUs", justify="right")
    for h in HEADERS:
        t.add_column(h, justify="right")
    t.add_column("need", justify="right")
    t.add_column("has", justify="right")
    t.add_column("fits", no_wrap=True)
    for group in _groups(plan.rows):
        r = group[0]
        verdict = {True: "[green]yes[/green]", False: "[red]NO[/red]", None: "?"}[r.fits]
        has = _gib(r.have)
        if r.gpus == 0:  # CPU actors share their node's memory: checked together, below the table
            has, verdict = "host", "-"
        t.add_row(f"{r.branch} {_group_name(group)}", f"{r.gpus:g}",
                  *(_gib(r.parts[c]) if r.parts[c] else "-" for c in COLUMNS), _gib(r.need), has, verdict)
    return t


def render(plan: MemoryPlan, console) -> None:
    """The table, what it rests on, and what does not fit with the settings that fix it."""
    from rich.markup import escape
    from rich.text import Text

    for note in plan.notes:
        console.print(note, markup=False, soft_wrap=True)
    if plan.memory_source:
        console.print(f"memory: {plan.memory_source}", markup=False, soft_wrap=True)
    wide = console
    if console.width < TABLE_WIDTH:  # whole rows, even in a pipe (80 columns) or a narrow terminal
        from rich.console import Console

        wide = Console(file=console.file, width=TABLE_WIDTH, force_terminal=console.is_terminal,
                       no_color=console.no_color, color_system=console.color_system)
    wide.print(table(plan))
    seen = set()
    for group in _groups(plan.rows):
        r = group[0]
        line = f"  {r.branch} {_group_name(group)}: {r.detail}"
        if r.detail and line not in seen:
            seen.add(line)
            console.print(line, markup=False, soft_wrap=True)
    for c in plan.checks:
        style = {True: "green", False: "red", None: "yellow"}[c.fits]
        console.print(Text(c.message, style=style), soft_wrap=True)
    unchecked = [r for r in plan.rows if r.fits is None and r.gpus > 0]
    if unchecked:
        console.print(Text(f"{len(unchecked)} GPU actors could not be checked: {plan.memory_source}", style="yellow"),
                      soft_wrap=True)
    problems = plan.problems()
    for p in problems:
        console.print(Text(f"does not fit: {p}", style="red"), soft_wrap=True)
    if not problems:
        console.print(escape("every actor fits." if not unchecked else "nothing found that does not fit."))
