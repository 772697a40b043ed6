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

The package: `architecture` (the model, from its config.json), `cluster` (cluster.yaml),
`constants` (every constant of the estimate, each with where it comes from), `estimate` (one
actor's memory, part by part), `rows` (every actor against its bundle, the checks, the fixes)
and `table` (the console table).
"""

from copd_ray.plan.architecture import Architecture, architecture, architecture_from_hf
from copd_ray.plan.cluster import Cluster, read_cluster
from copd_ray.plan.constants import ACT_BYTES, INSTANCE_TYPES, LOGPROB_FLOAT32_COPIES, GiB, PlanError
from copd_ray.plan.estimate import TrainerKnobs, Workload, measured_prompt_tokens, trainer_parts, trainer_phases
from copd_ray.plan.rows import ActorMemory, Check, MemoryPlan, plan_memory
from copd_ray.plan.table import render, table

__all__ = ["ACT_BYTES", "INSTANCE_TYPES", "LOGPROB_FLOAT32_COPIES", "ActorMemory", "Architecture", "Check", "Cluster", "GiB",
           "MemoryPlan", "PlanError", "TrainerKnobs", "Workload", "architecture", "architecture_from_hf",
           "measured_prompt_tokens", "plan_memory", "read_cluster", "render", "table", "trainer_parts", "trainer_phases"]
