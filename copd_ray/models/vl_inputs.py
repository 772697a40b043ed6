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
from dataclasses import dataclass

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

    def model_kwargs(self, device: str | torch.device = "cpu") -> dict:
        """Keyword arguments for `forward` / `generate` of a batch of one."""
        out = {"input_ids": torch.tensor([self.input_ids], device=device),
               "mm_token_type_ids": torch.tensor([self.token_types], device=device)}
        for name in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value.to(device)
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


class VisionInputBuilder:
    def __init__(self, tokenizer, image_processor, config) -> None:
        self.tokenizer, self.processor = tokenizer, image_processor
        self.ids = {"start": config.vision_start_token_id, "end": config.vision_end_token_id,
                    IMAGE: config.image_token_id, VIDEO: config.video_token_id}
        self.merge = config.vision_config.spatial_merge_size

    @classmethod
    def from_pretrained(cls, folder: str) -> VisionInputBuilder:
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder),
                   AutoConfig.from_pretrained(folder))

    def build(self, text_ids: Sequence[int], images: Sequence = (), videos: Sequence[Sequence] = ()) -> VisualInputs:
        """bos, then each image and each video as a vision block, then the text ids (which
        may start with bos themselves; it is not repeated)."""
        text_ids = list(text_ids)
        if text_ids[:1] == [self.tokenizer.bos_token_id]:
            text_ids = text_ids[1:]
        ids, types = [self.tokenizer.bos_token_id], [TEXT]
        out = VisualInputs(ids, types)
        if images:
            pv = self.processor(images=[_as_pil(i) for i in images], return_tensors="pt")
            out.pixel_values, out.image_grid_thw = pv["pixel_values"], pv["image_grid_thw"]
            for grid in out.image_grid_thw:
                self._block(ids, types, IMAGE, int(grid.prod()) // self.merge**2)
        if videos:
            patches, grids = zip(*(self.video_patches(v) for v in videos))
            out.pixel_values_videos, out.video_grid_thw = torch.cat(patches), torch.stack(grids)
            for grid in out.video_grid_thw:
                self._block(ids, types, VIDEO, int(grid.prod()) // self.merge**2)
        ids += text_ids
        types += [TEXT] * len(text_ids)
        return out

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
        pil = [_as_pil(f) for f in frames]
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
