"""The embedded tiny vision-language policy: a Qwen2-VL shaped model built locally.

The character tokenizer of the text policy plus Qwen-VL's vision tokens, a two-layer
Qwen2-VL text model with a two-block vision tower, and the torchvision-free Qwen2-VL image
processor. Saved with `save_pretrained`, it reloads with `AutoModelForImageTextToText`,
`AutoTokenizer` and `AutoImageProcessor` like a real Qwen-VL checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration

from copd_ray.models.tiny import build_char_tokenizer

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
IMAGE_SIDE = 56  # pixels; with patch 14 and merge 2 an image is 4 vision tokens


def build_vl_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = build_char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    return tokenizer


def build_tiny_vl_policy(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 128, num_layers: int = 2,
                         num_heads: int = 4, intermediate_size: int = 256, vision_depth: int = 2,
                         vision_dim: int = 32, seed: int = 0) -> Qwen2VLForConditionalGeneration:
    """Head size 32 (hidden / heads) as vLLM's CPU kernels need; M-RoPE sections split the
    16 rotary pairs of a head over time, height and width."""
    head_pairs = hidden_size // num_heads // 2
    section = [head_pairs // 4, (head_pairs - head_pairs // 4) // 2]
    section.append(head_pairs - sum(section))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden_size, num_heads=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config)


def build_image_processor(side: int = IMAGE_SIDE):
    """Qwen2-VL's image processor in its PIL form (no torchvision), fixed to side x side."""
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side)


def save_vl_policy(model, tokenizer, image_processor, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path
