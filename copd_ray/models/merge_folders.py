"""Merging saved branch folders into one Hugging Face model folder."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

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
    """Merge the branches' weights (see `merge_state_dicts`) into `out`, laid out exactly like
    the first branch's folder: the same safetensors files holding the same tensor names,
    and its config, tokenizer and processor files. It loads with the Auto class the
    branches load with (a causal LM, or image-text-to-text for a vision-language model)."""
    from copd_ray.models.loading import model_class

    merged = merge_state_dicts(
        [read_weights(f) for f in branch_folders], weights,
        # Only task arithmetic uses the base: callers may always pass it, it is read when needed.
        base=read_weights(base_folder) if base_folder and method == "task_arithmetic" else None, method=method,
    )
    first, out = Path(branch_folders[0]), Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in first.iterdir():
        if item.suffix == ".safetensors":
            with safe_open(str(item), "pt") as f:
                names, metadata = list(f.keys()), f.metadata()
            save_file({n: merged[n].contiguous() for n in names}, str(tmp / item.name), metadata=metadata)
        elif item.is_file() and item.name != "trainer_state.pt":
            shutil.copy(item, tmp / item.name)
    model_class(str(tmp)).from_pretrained(tmp)  # it must load before it takes the place of a merge
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
