"""Synthetic visual capabilities with verifiable answers, rendered locally with numpy.

    count   one 56x56 image with 1-4 white squares on a 5x5 grid; answer: how many
    motion  a 4-frame 56x56 video of one square moving left, right, up or down; answer: which way

Two problems are the same when their prompt and pixels are (`pixels_key`), which is how
held-out problems are kept out of the training stream.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np

SIDE, CELLS, SQUARE = 56, 5, 8  # canvas, grid cells per side, square size (pixels)
CELL = SIDE // CELLS  # 11
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
FRAMES, STEP = 4, 8  # frames of a motion video, pixels moved per frame


def _canvas() -> np.ndarray:
    return np.zeros((SIDE, SIDE, 3), dtype=np.uint8)


def _draw(canvas: np.ndarray, top: int, left: int) -> None:
    canvas[top : top + SQUARE, left : left + SQUARE] = 255


def render_count(cells: list[int]) -> np.ndarray:
    image = _canvas()
    for c in cells:
        _draw(image, (c // CELLS) * CELL + 1, (c % CELLS) * CELL + 1)
    return image


def count_problem(rng: random.Random) -> dict:
    cells = sorted(rng.sample(range(CELLS * CELLS), rng.randint(1, 4)))
    return {"prompt": "count:", "answer": str(len(cells)), "images": [render_count(cells)]}


def render_motion(top: int, left: int, direction: str) -> list[np.ndarray]:
    dy, dx = DIRECTIONS[direction]
    frames = []
    for f in range(FRAMES):
        frame = _canvas()
        _draw(frame, top + dy * STEP * f, left + dx * STEP * f)
        frames.append(frame)
    return frames


def motion_problem(rng: random.Random) -> dict:
    direction = rng.choice(sorted(DIRECTIONS))
    dy, dx = DIRECTIONS[direction]
    travel = STEP * (FRAMES - 1)
    # Start where the whole path stays on the canvas.
    lo_y, hi_y = (travel, SIDE - SQUARE) if dy < 0 else (0, SIDE - SQUARE - travel * dy)
    lo_x, hi_x = (travel, SIDE - SQUARE) if dx < 0 else (0, SIDE - SQUARE - travel * dx)
    top, left = rng.randint(lo_y, hi_y), rng.randint(lo_x, hi_x)
    return {"prompt": "where:", "answer": direction, "videos": [render_motion(top, left, direction)]}


def pixels_key(prompt: str, images: list, videos: list) -> str:
    """A problem key from its pixels, equal for equal renderings."""
    digest = hashlib.sha256()
    for picture in [*images, *(f for v in videos for f in v)]:
        digest.update(np.ascontiguousarray(picture, dtype=np.uint8).tobytes())
    return f"{prompt}:{digest.hexdigest()}"
