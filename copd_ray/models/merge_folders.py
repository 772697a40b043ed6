"""Merging saved branch folders into one Hugging Face model folder."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from copd_ray.algo import merge_state_dicts


def read_weights(folder: str | Path) -> dict:
    """Every tensor of a folder's safetensors files (sharded or not)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors weights")
    weights = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights


def merge_folders(branch_folders: list[str | Path], out: str | Path, method: str = "mean",
                  weights: list[float] | None = None, base_folder: str | Path | None = None) -> Path:
    """Merge the branches' weights (see `merge_state_dicts`) and write `out` with the first
    branch's config and tokenizer, loadable with `AutoModelForCausalLM.from_pretrained`."""
    from transformers import AutoTokenizer

    from copd_ray.models.loading import copy_processor_files, model_class

    merged = merge_state_dicts(
        [read_weights(f) for f in branch_folders], weights,
        base=read_weights(base_folder) if base_folder else None, method=method,
    )
    model = model_class(str(branch_folders[0])).from_pretrained(branch_folders[0])
    missing, unexpected = model.load_state_dict(merged, strict=False)
    tied = {k for k in missing if model.config.tie_word_embeddings and "lm_head" in k}
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"merged weights do not fit the model: missing {missing}, unexpected {unexpected}")
    out = Path(out)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(branch_folders[0]).save_pretrained(out)
    copy_processor_files(branch_folders[0], out)
    return out
