"""Merging saved branch folders into one Hugging Face model folder, tensor by tensor: the
merge holds one tensor of each branch at a time, never a whole model (a 4B model's two
float32 branches and their merge would otherwise be ~48 GB on the head node)."""

from __future__ import annotations

import json
import math
import shutil
import struct
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from copd_ray.algo import merge_state_dicts

_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _weight_files(folder: str | Path) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors weights")
    return files


def _open_tensors(folder: str | Path, stack: ExitStack) -> dict:
    """Each tensor name of a folder -> the open file it lies in (read lazily)."""
    where = {}
    for f in _weight_files(folder):
        handle = stack.enter_context(safe_open(str(f), "pt"))
        where.update(dict.fromkeys(handle.keys(), handle))
    return where


def merge_folders(branch_folders: list[str | Path], out: str | Path, method: str = "mean",
                  weights: list[float] | None = None, base_folder: str | Path | None = None) -> Path:
    """Merge the branches' weights (see `merge_state_dicts`) into `out`, laid out exactly like
    the first branch's folder: the same safetensors files holding the same tensor names,
    and its config, tokenizer and processor files. It loads with the Auto class the
    branches load with (a causal LM, or image-text-to-text for a vision-language model)."""
    first, out = Path(branch_folders[0]), Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with ExitStack() as stack:
        branches = [_open_tensors(f, stack) for f in branch_folders]
        for i, branch in enumerate(branches[1:], start=1):
            if branch.keys() != branches[0].keys():
                raise ValueError(f"{branch_folders[i]} holds other tensors than {first}, e.g. "
                                 f"{sorted(set(branch) ^ set(branches[0]))[:5]}")
        # Only task arithmetic uses the base: callers may always pass it, it is read when needed.
        base = _open_tensors(base_folder, stack) if base_folder and method == "task_arithmetic" else None
        for item in first.iterdir():
            if item.suffix == ".safetensors":
                _write_merged(item, tmp / item.name, branches, base, weights, method)
            elif item.is_file() and item.name != "trainer_state.pt":
                shutil.copy(item, tmp / item.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _write_merged(source: Path, target: Path, branches: list[dict], base: dict | None, weights, method: str) -> None:
    """`source`'s tensors (a file of the first branch) merged, written one at a time in the
    safetensors format (a JSON header of names, dtypes, shapes and offsets, then the bytes)."""
    with safe_open(str(source), "pt") as f:
        names, metadata = list(f.keys()), f.metadata()
        slices = {n: f.get_slice(n) for n in names}
        header, offset = {}, 0
        for n in names:
            shape, dtype = slices[n].get_shape(), slices[n].get_dtype()
            if dtype not in _ITEM_BYTES:
                raise ValueError(f"{source}: {n} has dtype {dtype}, which the merge does not write")
            size = math.prod(shape) * _ITEM_BYTES[dtype]
            header[n] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(target, "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        for n in names:
            parts = [{n: branch[n].get_tensor(n)} for branch in branches]
            merged = merge_state_dicts(parts, weights, {n: base[n].get_tensor(n)} if base else None, method)[n]
            data = merged.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            if len(data) != header[n]["data_offsets"][1] - header[n]["data_offsets"][0]:
                raise ValueError(f"{n}: the merge gave {merged.dtype} {tuple(merged.shape)}, not the branch's layout")
            out.write(data)
    with safe_open(str(target), "pt") as check:  # it must read back before it takes the place of a merge
        if sorted(check.keys()) != sorted(names):
            raise ValueError(f"{target}: written tensors do not read back")
