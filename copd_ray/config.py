"""The one config schema: typed, validated, loaded from YAML with dotted overrides.

`Config()` with no arguments is the embedded default (two synthetic capabilities on the
tiny policy, local Ray, CPU); `configs/default.yaml` spells the same thing out. Every
check that can fail runs here, before any actor starts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from copd_ray.data.synthetic import TASKS
from copd_ray.rewards import get_reward


class ConfigError(ValueError):
    """A config that cannot run, with every problem named."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(Section):
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(256, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self


class ModelConfig(Section):
    # A Hugging Face model folder; None means the embedded tiny policy (built and warmed
    # up by `copd-ray bootstrap`, cached on disk).
    path: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    tiny: TinyModelConfig = TinyModelConfig()

    @field_validator("path")
    @classmethod
    def _path_exists(cls, v):
        if v is not None and not Path(v).expanduser().exists():
            raise ValueError(f"model folder {v} does not exist (nothing is downloaded from a hub here)")
        return v


class CapabilityConfig(Section):
    name: str
    # "synthetic:<task>" or a dataset path (.jsonl, .parquet, or a saved HF dataset folder).
    source: str
    # Held-out set: a dataset path, or None to hold out `heldout_size` rows of `source`
    # (synthetic tasks generate a fixed, seeded set).
    heldout: str | None = None
    heldout_size: int = Field(500, gt=0)
    reward: str = "exact_match"
    prompt_key: str | None = None  # None: the first of prompt / problem / question
    answer_key: str = "answer"
    split: str = "train"
    template: str = "{prompt}"

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", v):
            raise ValueError(f"capability name {v!r} may hold only letters, digits, '_' and '-'")
        return v

    @field_validator("source", "heldout")
    @classmethod
    def _source(cls, v):
        if v is None:
            return v
        if v.startswith("synthetic:"):
            task = v.split(":", 1)[1]
            if task not in TASKS:
                raise ValueError(f"unknown synthetic task {task!r}; known: {sorted(TASKS)}")
        elif not Path(v).expanduser().exists():
            raise ValueError(f"dataset {v} does not exist")
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
        CapabilityConfig(name="add", source="synthetic:add"),
        CapabilityConfig(name="mul", source="synthetic:mul"),
    ]


class BootstrapConfig(Section):
    """Supervised warm-up of the tiny policy until every capability is moderately good."""

    max_steps: int = Field(3000, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(50, ge=0)
    eval_every: int = Field(50, gt=0)
    # Done when every capability's held-out pass rate lies in [aim, high]. A capability
    # past `aim` is only replayed (replay_fraction of the batch) while the others catch up.
    low: float = Field(0.2, ge=0, le=1)
    aim: float = Field(0.3, ge=0, le=1)
    high: float = Field(0.6, ge=0, le=1)
    replay_fraction: float = Field(0.1, ge=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low <= self.aim <= self.high:
            raise ValueError(f"need low <= aim <= high, got {self.low}, {self.aim}, {self.high}")
        return self


class EngineConfig(Section):
    kind: Literal["hf"] = "hf"
    max_batch_size: int = Field(512, gt=0)


class EvalConfig(Section):
    max_new_tokens: int = Field(8, gt=0)


class Config(Section):
    run_name: str = "copd-demo"
    output_dir: str = "outputs/copd-demo"
    cache_dir: str = "~/.cache/copd-ray"
    seed: int = 0
    num_threads: int = Field(2, gt=0)  # torch threads per process; the machine has few cores
    model: ModelConfig = ModelConfig()
    capabilities: list[CapabilityConfig] = Field(default_factory=_default_capabilities)
    bootstrap: BootstrapConfig = BootstrapConfig()
    engine: EngineConfig = EngineConfig()
    eval: EvalConfig = EvalConfig()

    @field_validator("capabilities")
    @classmethod
    def _unique(cls, v):
        if not v:
            raise ValueError("at least one capability is needed")
        names = [c.name for c in v]
        if len(set(names)) != len(names):
            raise ValueError(f"capability names repeat: {names}")
        return v

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


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config from a YAML file (or the embedded default) with "a.b=value" overrides.

    Values are read as YAML, so `bootstrap.lr=5e-4`, `model.path=null` and
    `capabilities=[...]` all work.
    """
    tree: dict = Config().model_dump(mode="json")
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        tree = loaded
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        problems = "\n".join(
            f"  {'.'.join(str(p) for p in err['loc']) or '<top>'}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"invalid config{f' {path}' if path else ''}:\n{problems}") from None
