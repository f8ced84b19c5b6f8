"""Image sources for ``pipeline.data.prepare``: the embedded digits and a user's image folder.

A source is a list of ``SourceItem`` (key, label, metadata, and a ``load()`` that returns a PIL image)
plus class names. ``prepare_image`` turns any image into the dataset's size and mode.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
MODES = {1: "L", 3: "RGB"}


@dataclass
class SourceItem:
    key: str  # sample key in the shards: [A-Za-z0-9_-], no dots
    label: int
    meta: dict[str, Any]
    load: Callable[[], Image.Image]


@dataclass
class Source:
    description: str
    class_names: list[str]
    items: list[SourceItem]
    notes: list[str] = field(default_factory=list)  # things the user should know (ignored files...)
    info: dict[str, Any] = field(default_factory=dict)  # goes into the manifest's "source"


def digits_source() -> Source:
    """scikit-learn's bundled handwritten digits: 1,797 real 8x8 grayscale images, classes 0-9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    items = []
    for i, (img, label) in enumerate(zip(images, d.target, strict=True)):
        items.append(
            SourceItem(
                key=f"digits-{i:05d}",
                label=int(label),
                meta={"source": "sklearn.datasets.load_digits", "index": i, "original_size": [8, 8]},
                load=lambda img=img: Image.fromarray(img, mode="L"),
            )
        )
    return Source(
        description="scikit-learn load_digits(): 1,797 handwritten digits, 8x8, 0..16 scaled to 0..255",
        class_names=[str(c) for c in range(10)],
        items=items,
        info={"kind": "digits", "loader": "sklearn.datasets.load_digits", "num_source_images": len(items)},
    )


def _is_image_file(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _open_image(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        img.load()
        return img


def folder_source(root: str | Path) -> Source:
    """Images under root: one class per sub-folder (searched recursively), or flat (one class).

    Class mode is used when any sub-folder holds images; images directly under root are then
    ignored (and noted). Files with other extensions and hidden files are ignored. Files are only
    opened when written, so unreadable ones are reported then.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    notes: list[str] = []
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes: list[tuple[str, list[Path]]] = []
    for d in subdirs:
        files = sorted(p for p in d.rglob("*") if _is_image_file(p))
        if files:
            classes.append((d.name, files))
    top = sorted(p for p in root.iterdir() if _is_image_file(p))
    if classes:
        mode = "classes"
        if top:
            notes.append(f"{len(top)} image(s) directly under {root} ignored: class sub-folders are used")
    else:
        mode = "flat"
        classes = [(root.resolve().name or "images", top)]
    items = []
    i = 0
    for label, (_, files) in enumerate(classes):
        for p in files:
            rel = p.relative_to(root).as_posix()
            items.append(
                SourceItem(
                    key=f"img-{i:07d}",
                    label=label,
                    meta={"source": "folder", "path": rel},
                    load=lambda p=p: _open_image(p),
                )
            )
            i += 1
    return Source(
        description=f"image folder {root.resolve()} ({mode}: {len(classes)} class(es), {len(items)} file(s))",
        class_names=[c for c, _ in classes],
        items=items,
        notes=notes,
        info={"kind": "folder", "path": str(root.resolve()), "layout": mode, "num_source_images": len(items)},
    )


def prepare_image(img: Image.Image, size: int, channels: int) -> Image.Image:
    """Resize the shorter side to ``size`` and center-crop to size x size; convert to L or RGB.

    Transparent images are composited over white first.
    """
    mode = MODES[channels]
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    if img.size != (size, size):
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    return img.convert(mode) if img.mode != mode else img


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def split_items(
    items: Sequence[SourceItem], eval_fraction: float, seed: int
) -> tuple[list[SourceItem], list[SourceItem]]:
    """Stratified, seeded train/eval split; both parts shuffled (shards then mix classes).

    Each class gives round-ish ``eval_fraction`` of its items to eval (largest-remainder rounding so
    the eval total is ``round(eval_fraction * N)``), but always keeps at least one for train.
    """
    rng = random.Random(seed)
    by_class: dict[int, list[SourceItem]] = {}
    for it in items:
        by_class.setdefault(it.label, []).append(it)
    labels = sorted(by_class)
    for c in labels:
        rng.shuffle(by_class[c])
    total_eval = round(eval_fraction * len(items))
    quotas = {c: eval_fraction * len(by_class[c]) for c in labels}
    take = {c: int(quotas[c]) for c in labels}
    rest = total_eval - sum(take.values())
    for c in sorted(labels, key=lambda c: (-(quotas[c] - take[c]), c)):
        if rest <= 0:
            break
        take[c] += 1
        rest -= 1
    train, evals = [], []
    for c in labels:
        k = min(take[c], max(len(by_class[c]) - 1, 0))
        evals += by_class[c][:k]
        train += by_class[c][k:]
    rng.shuffle(train)
    rng.shuffle(evals)
    return train, evals
