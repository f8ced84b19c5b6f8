"""Sample grids: the picture a user looks at, logged during training and written by the sampling job."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np


def make_grid(images: np.ndarray, *, min_cell: int = 32, pad: int = 2) -> Any:
    """A square-ish PIL grid of uint8 NHWC images, upscaled (nearest) so a cell is >= min_cell px."""
    from PIL import Image

    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    scale = max(1, math.ceil(min_cell / max(h, w)))
    ch, cw = h * scale, w * scale
    canvas = np.full((rows * (ch + pad) + pad, cols * (cw + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        img = images[i].repeat(scale, axis=0).repeat(scale, axis=1)
        y, x = pad + r * (ch + pad), pad + q * (cw + pad)
        canvas[y : y + ch, x : x + cw] = img
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas, mode="L" if c == 1 else "RGB")


def grid_png(images: np.ndarray, **kw) -> bytes:
    """``make_grid`` as PNG bytes."""
    buf = io.BytesIO()
    make_grid(images, **kw).save(buf, format="PNG")
    return buf.getvalue()
