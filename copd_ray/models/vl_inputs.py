"""One path from a prompt's text, images and videos to vision-language model inputs.

Qwen-VL models read a picture as a run of pad tokens between vision-start and vision-end
tokens, one pad per merged patch, plus the patches themselves (`pixel_values`, with a
`grid_thw` per picture) and `mm_token_type_ids` (0 text, 1 image, 2 video) for M-RoPE.
Images go through the model's own image processor (its torchvision-free PIL form here);
videos are patchified below in the same layout the Qwen-VL video processor uses, since
that processor needs torchvision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TEXT, IMAGE, VIDEO = 0, 1, 2


@dataclass
class VisualInputs:
    input_ids: list[int]
    token_types: list[int]  # TEXT, IMAGE or VIDEO per token
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    # The pictures as read (RGB PIL images; videos as uint8 frame arrays [T, H, W, 3]), for
    # an engine that runs the model's own processor on them (vLLM) instead of taking pixels.
    images: list | None = None
    videos: list | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def __add__(self, tokens: Sequence[int]) -> VisualInputs:
        """The prompt followed by response tokens (what a policy is trained and scored on)."""
        tokens = list(tokens)
        return replace(self, input_ids=self.input_ids + tokens, token_types=self.token_types + [TEXT] * len(tokens))

    def model_kwargs(self, device: str | torch.device = "cpu") -> dict:
        """Keyword arguments for `forward` / `generate` of a batch of one."""
        ids, mask, extra = collate([self], 0, device=device)
        return {"input_ids": ids, **extra}


PIXELS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
BANNED = -1e9  # a logit no sample takes; finite, so that 0 * log p stays 0 in entropies


def vision_token_ids(config) -> list[int]:
    """Tokens a policy must never write (they mark where pixels go); none for a text model."""
    names = ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id")
    return [getattr(config, n) for n in names if getattr(config, n, None) is not None]


def ban_tokens(logits: torch.Tensor, banned: list[int]) -> torch.Tensor:
    """The logits with the banned tokens' set to BANNED, so that sampling, scoring and
    training all use one distribution over the tokens a response may hold."""
    if banned:
        logits = logits.clone()
        logits[..., banned] = BANNED
    return logits


def token_ids(sequence) -> list[int]:
    return sequence.input_ids if isinstance(sequence, VisualInputs) else list(sequence)


def collate(sequences: Sequence, pad_id: int, left: bool = False, device: str | torch.device = "cpu"):
    """(input_ids [B, W], attention_mask [B, W], extra forward kwargs) of token-id lists or
    VisualInputs, padded on the left (generation) or right (scoring, training). For
    VisualInputs the extras are `mm_token_type_ids`, laid out like the ids, and the
    pixels and grids of every row, concatenated in row order as Qwen-VL models expect."""
    rows = [token_ids(s) for s in sequences]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    visual = [s for s in sequences if isinstance(s, VisualInputs)]
    types = torch.zeros_like(ids) if visual else None
    for i, (seq, row) in enumerate(zip(sequences, rows)):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, cols], mask[i, cols] = torch.tensor(row), 1
        if types is not None and isinstance(seq, VisualInputs):
            types[i, cols] = torch.tensor(seq.token_types)
    extra = {} if types is None else {"mm_token_type_ids": types.to(device), **pixel_kwargs(visual, device)}
    return ids.to(device), mask.to(device), extra


def pixel_kwargs(sequences: Sequence, device: str | torch.device = "cpu") -> dict:
    """The pixels and grids of these sequences (those that have any), concatenated in order."""
    out = {}
    for name in PIXELS:
        parts = [getattr(s, name) for s in sequences if getattr(s, name, None) is not None]
        if parts:
            out[name] = torch.cat(parts).to(device)
    return out


def _as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        import io

        return Image.open(io.BytesIO(image)).convert("RGB")
    if isinstance(image, str):
        return Image.open(image).convert("RGB")
    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")


def _frames(video) -> list:
    """A video as its frames: a list of pictures, an array [F, H, W, 3], a folder of frame
    images (in name order) or a .npy file of such an array."""
    if isinstance(video, str):
        path = Path(video)
        if path.is_dir():
            return sorted((str(f) for f in path.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg")))
        if path.suffix == ".npy":
            return list(np.load(path))
        raise ValueError(f"video {video}: give its frames (a folder of images or a .npy array); decoding video "
                         "files needs a decoder that is not a dependency")
    return list(video)


def frame_array(video) -> np.ndarray:
    """A video's frames as one uint8 array [T, H, W, 3], every frame at the first one's size."""
    frames = [_as_pil(f) for f in _frames(video)]
    size = frames[0].size
    return np.stack([np.asarray(f if f.size == size else f.resize(size, Image.BICUBIC)) for f in frames])


class VisionInputBuilder:
    def __init__(self, tokenizer, image_processor, config) -> None:
        self.tokenizer, self.processor = tokenizer, image_processor
        self.ids = {"start": config.vision_start_token_id, "end": config.vision_end_token_id,
                    IMAGE: config.image_token_id, VIDEO: config.video_token_id}
        self.merge = config.vision_config.spatial_merge_size

    @classmethod
    def for_folder(cls, folder: str, trust_remote_code: bool = False) -> VisionInputBuilder | None:
        """The builder of a vision-language model folder; None for a text-only model."""
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        if getattr(config, "vision_config", None) is None:
            return None
        return cls(AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code),
                   AutoImageProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code), config)

    def build(self, text_ids: Sequence[int], images: Sequence = (), videos: Sequence[Sequence] = ()) -> VisualInputs:
        """bos, then each image and each video as a vision block, then the text ids (which
        may start with bos themselves; it is not repeated). For a policy without a chat
        template (the tiny one); `fill` follows a chat template's placement instead."""
        text_ids = list(text_ids)
        if text_ids[:1] == [self.tokenizer.bos_token_id]:
            text_ids = text_ids[1:]
        ids, types = [self.tokenizer.bos_token_id], [TEXT]
        out = VisualInputs(ids, types)
        counts = self._pixels(out, images, videos)
        for kind in (IMAGE, VIDEO):
            for n in counts[kind]:
                self._block(ids, types, kind, n)
        ids += text_ids
        types += [TEXT] * len(text_ids)
        return out

    def fill(self, templated_ids: Sequence[int], images: Sequence = (), videos: Sequence[Sequence] = ()) -> VisualInputs:
        """Ids from a Qwen-VL chat template, which writes one pad token per image or video
        part where the part sits; each pad grows to its picture's token count, in order,
        as the model's own processor does."""
        out = VisualInputs([], [])
        counts = self._pixels(out, images, videos)
        for t in templated_ids:
            kind = IMAGE if t == self.ids[IMAGE] else VIDEO if t == self.ids[VIDEO] else TEXT
            if kind == TEXT:
                out.input_ids.append(t)
                out.token_types.append(TEXT)
                continue
            if not counts[kind]:
                raise ValueError(f"the chat template wrote more {'image' if kind == IMAGE else 'video'} "
                                 f"placeholders than the record has ({len(images)} images, {len(videos)} videos)")
            n = counts[kind].pop(0)
            out.input_ids += [t] * n
            out.token_types += [kind] * n
        if counts[IMAGE] or counts[VIDEO]:
            raise ValueError(f"the chat template placed {len(images) - len(counts[IMAGE])} of {len(images)} images and "
                             f"{len(videos) - len(counts[VIDEO])} of {len(videos)} videos: its messages need an "
                             "image or video part for each")
        return out

    def _pixels(self, out: VisualInputs, images: Sequence, videos: Sequence[Sequence]) -> dict[int, list[int]]:
        """Set the pixel tensors of `out`; return the token count of each image and video."""
        counts: dict[int, list[int]] = {IMAGE: [], VIDEO: []}
        if images:
            out.images = [_as_pil(i) for i in images]
            pv = self.processor(images=out.images, return_tensors="pt")
            out.pixel_values, out.image_grid_thw = pv["pixel_values"], pv["image_grid_thw"]
            counts[IMAGE] = [int(g.prod()) // self.merge**2 for g in out.image_grid_thw]
        if videos:
            out.videos = [frame_array(v) for v in videos]
            patches, grids = zip(*(self.video_patches(v) for v in out.videos))
            out.pixel_values_videos, out.video_grid_thw = torch.cat(patches), torch.stack(grids)
            counts[VIDEO] = [int(g.prod()) // self.merge**2 for g in out.video_grid_thw]
        return counts

    def _block(self, ids: list[int], types: list[int], kind: int, n: int) -> None:
        ids += [self.ids["start"]] + [self.ids[kind]] * n + [self.ids["end"]]
        types += [TEXT] + [kind] * n + [TEXT]

    def video_patches(self, frames: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames -> (patches [t*h*w, C*T*P*P], grid (t, h, w)), the Qwen-VL video layout:
        frames resized and normalised like images, grouped `temporal_patch_size` at a time
        (the last frame repeated to fill a group)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        proc = self.processor
        p, m, tps = proc.patch_size, proc.merge_size, proc.temporal_patch_size
        pil = [_as_pil(f) for f in _frames(frames)]
        h, w = smart_resize(pil[0].height, pil[0].width, factor=p * m, min_pixels=proc.size["shortest_edge"],
                            max_pixels=proc.size["longest_edge"])
        arr = np.stack([np.asarray(f.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0 for f in pil])
        arr = (arr - np.array(proc.image_mean, dtype=np.float32)) / np.array(proc.image_std, dtype=np.float32)
        arr = arr.transpose(0, 3, 1, 2)  # F, C, H, W
        if len(arr) % tps:
            arr = np.concatenate([arr, np.repeat(arr[-1:], tps - len(arr) % tps, axis=0)])
        gt, gh, gw, c = len(arr) // tps, h // p, w // p, arr.shape[1]
        x = arr.reshape(gt, tps, c, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return torch.from_numpy(np.ascontiguousarray(x.reshape(gt * gh * gw, c * tps * p * p))), torch.tensor([gt, gh, gw])
