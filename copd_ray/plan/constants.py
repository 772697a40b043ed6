"""The estimate's constants, in one place, each with where it comes from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from copd_ray.errors import CopdError


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
    "qwen3-vl-4b": Path(__file__).resolve().parents[2] / "configs" / "models" / "qwen3-vl-4b",
}


class PlanError(CopdError, ValueError):
    pass


