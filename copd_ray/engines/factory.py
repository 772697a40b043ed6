"""Building the engine a generator or scorer holds, by its kind."""

from __future__ import annotations


def make_engine(kind: str, model_path: str, engine_cfg: dict, dtype: str = "float32",
                trust_remote_code: bool = False, device: str = "cpu", threads: int = 1, seed: int = 0):
    """(engine, tokenizer) for `kind` in hf | vllm | sglang; `engine_cfg` is the config's
    `engine` section as a dict."""
    from transformers import AutoTokenizer

    from copd_ray.models.loading import load_policy, quiet_transformers

    quiet_transformers()
    if kind == "hf":
        from copd_ray.engines.hf import HFEngine

        model, tokenizer = load_policy(model_path, dtype, trust_remote_code, device)
        return HFEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, engine_cfg["max_batch_size"]), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if kind == "vllm":
        from copd_ray.engines.vllm import VLLMEngine

        return VLLMEngine(model_path, dtype=dtype, seed=seed, trust_remote_code=trust_remote_code, threads=threads,
                          **engine_cfg["vllm"]), tokenizer
    if kind == "sglang":
        from copd_ray.engines.sglang import SGLangEngine

        return SGLangEngine(model_path, dtype=dtype, seed=seed, trust_remote_code=trust_remote_code,
                            **engine_cfg["sglang"]), tokenizer
    raise ValueError(f"unknown engine kind {kind!r}; choose hf, vllm or sglang")
