"""One image, bytes in -> bytes out: the per-image work of ingestion (``pipeline.data.ingest``).

``convert(data, size, channels, image_format, quality)`` decodes an encoded image, applies its EXIF
orientation, converts its mode (alpha composited over white; 16-bit scaled to 8 bits, not clipped;
CMYK and the rest converted to RGB), resizes the shorter side to ``size`` and centre-crops, and
encodes PNG, JPEG or WebP. An image that cannot be used raises ``SkipImage`` with one of ``REASONS``;
nothing else is raised for bad image data, so one bad file never stops a job.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MIN_SIDE = 8  # images whose shorter side is below this many pixels are skipped as too_small
FORMATS = {"png": ("PNG", "png"), "jpeg": ("JPEG", "jpg"), "webp": ("WEBP", "webp")}  # name -> (PIL, member ext)
REASONS = {
    "empty": "zero bytes",
    "not_an_image": "not an image PIL can identify (e.g. a text file named .jpg)",
    "truncated": "the file ends before the image does",
    "too_small": f"shorter side below {MIN_SIDE} px",
    "too_large": "more pixels than PIL's decompression-bomb limit",
    "undecodable": "identified but could not be decoded or converted",
    "missing": "listed, but gone when read",
    "no_image": "a WebDataset sample without a jpg/jpeg/png/webp member",
    "no_label": "a WebDataset sample without the label asked for (--label-key, or cls)",
}
MODES = {1: "L", 3: "RGB"}


class SkipImage(Exception):  # noqa: N818 - a signal, not a failure of the job
    """This image is left out; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Converted:
    data: bytes  # the encoded image
    original_size: tuple[int, int]  # (width, height) as stored, before orientation
    original_mode: str


def decode(data: bytes, *, size: int | None = None, min_side: int = MIN_SIDE) -> tuple[Image.Image, tuple[int, int]]:
    """(the decoded image, loaded and with its orientation applied; (width, height) as stored). With ``size``, a JPEG is decoded at the
    smallest DCT scale whose shorter side is still >= size (Pillow's draft mode: 256 -> 64 px decodes
    a quarter of the pixels)."""
    if not data:
        raise SkipImage("empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise SkipImage("not_an_image", f"{len(data)} bytes starting {data[:8]!r}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipImage("too_large", str(e)) from None
    except Exception as e:  # noqa: BLE001 - a broken header
        raise SkipImage("undecodable", f"{type(e).__name__}: {e}") from None
    if min(img.size) < min_side:
        raise SkipImage("too_small", f"{img.size[0]}x{img.size[1]}")
    stored = (img.width, img.height)
    try:
        if size is not None and img.format == "JPEG":
            img.draft(None, (size, size))
        img.load()
        img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = "truncated" if "truncat" in str(e).lower() or isinstance(e, EOFError) else "undecodable"
        raise SkipImage(reason, f"{type(e).__name__}: {e}") from None
    return img, stored


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """L (channels 1) or RGB (3). Alpha is composited over white; 16- and 32-bit integer images are
    scaled to 0..255 (65535 -> 255; PIL's own convert would clip at 255); CMYK, YCbCr, palette... -> RGB."""
    mode = MODES[channels]
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) <= 65535 else float(arr.max())
        img = Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img).astype(np.float64)
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        img = Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    return img.convert(mode) if img.mode != mode else img


def fit(img: Image.Image, size: int) -> Image.Image:
    """Shorter side resized to ``size`` (Lanczos), then the centre ``size`` x ``size`` crop."""
    if img.size == (size, size):
        return img
    return ImageOps.fit(img, (size, size), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def encode(img: Image.Image, image_format: str = "png", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        img.save(buf, format="PNG", optimize=False)
    elif image_format == "jpeg":
        img.save(buf, format="JPEG", quality=quality)
    elif image_format == "webp":
        img.save(buf, format="WEBP", quality=quality)
    else:
        raise ValueError(f"image_format must be one of {', '.join(FORMATS)}, got {image_format!r}")
    return buf.getvalue()


def convert(
    data: bytes,
    size: int,
    channels: int,
    image_format: str = "png",
    quality: int = 95,
    *,
    min_side: int = MIN_SIDE,
) -> Converted:
    """Encoded image -> the dataset's encoded image, or ``SkipImage``."""
    img, original = decode(data, size=size, min_side=min_side)
    original_mode = img.mode
    try:
        out = encode(fit(to_mode(img, channels), size), image_format, quality)
    except (OSError, ValueError, SyntaxError) as e:
        reason = "truncated" if "truncat" in str(e).lower() else "undecodable"
        raise SkipImage(reason, f"{type(e).__name__}: {e}") from None
    return Converted(out, original, original_mode)
