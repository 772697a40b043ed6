"""Turning a prompt record into the token ids a policy is prompted with."""

from __future__ import annotations

from copd_ray.data.records import PromptRecord


def prompt_messages(record: PromptRecord, template: str = "{prompt}") -> list[dict]:
    if record.messages is not None:
        return record.messages
    text = template.format(prompt=record.prompt)
    if record.images or record.videos:
        # Content parts, as Qwen-VL chat templates expect: one placeholder per picture, then the text.
        parts = [{"type": "image"} for _ in record.images] + [{"type": "video"} for _ in record.videos]
        return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]
    return [{"role": "user", "content": text}]


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Messages through the tokenizer's chat template, the assistant's turn opened."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The chat template already wrote any bos token.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(record: PromptRecord, tokenizer, template: str = "{prompt}") -> list[int]:
    """Through the tokenizer's chat template when it has one; else the templated text as is
    (the tiny policy has no chat template: it reads "123+045=" and writes the sum)."""
    if getattr(tokenizer, "chat_template", None):
        return chat_ids(tokenizer, prompt_messages(record, template))
    if record.messages is not None:
        raise ValueError(
            f"record {record.id!r} has chat messages but the tokenizer has no chat template"
        )
    return tokenizer(template.format(prompt=record.prompt))["input_ids"]


def encode_prompt(record: PromptRecord, tokenizer, template: str = "{prompt}", vision=None):
    """What a policy reads: the prompt's token ids, or for a vision-language policy
    (`vision`, a VisionInputBuilder) those ids with the record's images and videos."""
    ids = prompt_ids(record, tokenizer, template)
    if vision is not None:
        if getattr(tokenizer, "chat_template", None):  # a real checkpoint: its template places the pictures
            return vision.fill(ids, record.images, record.videos)
        return vision.build(ids, record.images, record.videos)
    if record.images or record.videos:
        raise ValueError(f"record {record.id!r} has images or videos, but the policy reads text only")
    return ids
