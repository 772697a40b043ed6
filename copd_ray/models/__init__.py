"""Policies: loading checkpoints, the embedded tiny policy, and where a base policy is cached."""

import importlib

# Resolved on first use: importing a submodule (say vl_inputs, which the driver needs) must
# not import transformers' model classes (~2 s of CPU) into every process that touches it.
_EXPORTS = {"load_policy": "loading", "build_char_tokenizer": "tiny", "build_tiny_policy": "tiny",
            "save_policy": "tiny"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
