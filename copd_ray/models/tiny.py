"""The embedded tiny policy: a character tokenizer and a small Llama, built locally.

Nothing can be downloaded here, so the default policy is made from scratch and saved
with `save_pretrained`, after which it loads like any Hugging Face checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARSET = "0123456789+-*=/ ().,:?abcdefghijklmnopqrstuvwxyz"


def build_char_tokenizer(charset: str = CHARSET) -> PreTrainedTokenizerFast:
    """One token per character; `<s>` prepended like a Llama tokenizer, `</s>` ends answers."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(set(charset)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_tiny_policy(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 256,
    max_positions: int = 256,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A small Llama whose vocabulary is exactly the tokenizer's (vLLM samples from
    `vocab_size`; extra rows would decode to nothing). Head size 32 suits vLLM's CPU kernels."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_policy(model, tokenizer, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)  # safetensors
    tokenizer.save_pretrained(path)
    return path
