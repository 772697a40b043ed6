"""Loading a policy and its tokenizer the ordinary Hugging Face way."""

from __future__ import annotations

from pathlib import Path

import torch

# transformers is imported where a model is loaded: the driver and the Learner's module read
# this file for torch_dtype, and its model classes cost ~2 s of CPU in every process that imports them.


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a config names ("bfloat16") or a tensor spec records ("torch.bfloat16")."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype


def actor_device(gpus: float) -> str:
    """Where an actor (or task) given `gpus` runs its model: on "cuda" only when Ray gave it a
    GPU and it sees one."""
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def quiet_transformers() -> None:
    """No per-load progress bars: many actors load models at once and would bury the run's own output."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def model_class(path: str, trust_remote_code: bool = False):
    """The Auto class a folder loads with: image-text-to-text for a vision-language model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM


def runtime_state_dict(folder: str, trust_remote_code: bool = False) -> dict:
    """A saved folder's float32 weights on CPU under the names a loaded model uses. Through
    from_pretrained: a vision-language checkpoint's tensor names on disk are not its
    runtime names, and transformers alone knows the mapping."""
    import torch

    quiet_transformers()
    saved = model_class(folder, trust_remote_code).from_pretrained(folder, dtype=torch.float32,
                                                                   trust_remote_code=trust_remote_code)
    return saved.state_dict()


def load_policy(path: str, dtype: str = "float32", trust_remote_code: bool = False, device: str = "cpu"):
    """(model, tokenizer) from a local folder. Remote code runs only when asked for."""
    from transformers import AutoTokenizer

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = model_class(path, trust_remote_code).from_pretrained(
        path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code
    ).to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja")


def copy_processor_files(src: str | Path, dst: str | Path) -> None:
    """A vision-language model's processor files travel with its weights into every folder
    written from it (branches, checkpoints, merges), so each loads on its own."""
    import shutil

    for name in PROCESSOR_FILES:
        if (Path(src) / name).exists():
            shutil.copy(Path(src) / name, Path(dst) / name)
