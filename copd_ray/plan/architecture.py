"""The model's architecture: parameter counts and widths from its config.json, no weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


from copd_ray.config import Config
from copd_ray.plan.constants import KNOWN_ARCHITECTURES, PlanError


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


