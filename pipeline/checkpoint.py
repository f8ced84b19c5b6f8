"""Checkpoint files: written so that a partial one is never taken for a whole one.

A checkpoint is a directory ``images_<N>`` holding ``checkpoint.pt`` (a dict of tensors and
plain values, loaded only with ``torch.load(weights_only=True)``) and ``meta.json``, written last,
with the file's sha256. A directory without a matching ``meta.json`` is incomplete or corrupt and
is skipped in favour of an older one.

For sampling, a smaller file (weights, EMA, model and schedule config; no optimizer) is logged to
MLflow as ``checkpoints/images_<N>.pt``; see ``sampling_export``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from pipeline.ddpm.unet import UNet, UNetConfig

CKPT_FILE = "checkpoint.pt"
META_FILE = "meta.json"
FORMAT = 1


class CorruptCheckpoint(RuntimeError):
    pass


_NAME_RE = re.compile(r"^images_(\d+)(?:-g(\d+))?$")


def checkpoint_name(images_seen: int, generation: int = 0) -> str:
    """``images_<N>``; ``images_<N>-g<G>`` in generation G >= 1. A run that had to fall back past an
    unusable checkpoint continues in a new generation, so it never writes a name that storage (or a
    retention list) already holds."""
    return f"images_{images_seen:012d}" + (f"-g{generation}" if generation else "")


def parse_name(name: str) -> tuple[int, int] | None:
    """(generation, images) of ``images_<N>[-g<G>]`` (also with ``.pt``), newest sorting last; None otherwise."""
    m = _NAME_RE.match(Path(name).name.removesuffix(".pt"))
    return (int(m[2] or 0), int(m[1])) if m else None


def images_of(name: str) -> int | None:
    """N of a name ``images_<N>[-g<G>]`` or the same with ``.pt``; None for other names."""
    parsed = parse_name(name)
    return parsed[1] if parsed else None


def to_cpu(obj):
    """The same nesting of dicts, lists and tuples with every tensor on the CPU: a file saved from a
    GPU then loads with a plain ``torch.load`` on a machine without one."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def write_checkpoint(state: dict, directory: str | Path, meta: dict | None = None) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(to_cpu(state), buf)
    data = buf.getvalue()
    (d / CKPT_FILE).write_bytes(data)
    info = {"format": FORMAT, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), **(meta or {})}
    tmp = d / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, d / META_FILE)
    return d


def read_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """(state, meta) of a complete checkpoint; ``CorruptCheckpoint`` names what is wrong otherwise."""
    d = Path(directory)
    meta_path, ckpt_path = d / META_FILE, d / CKPT_FILE
    if not meta_path.is_file():
        raise CorruptCheckpoint(f"{d}: no {META_FILE} (the checkpoint was not completely written)")
    meta = json.loads(meta_path.read_text())
    if not ckpt_path.is_file():
        raise CorruptCheckpoint(f"{d}: {CKPT_FILE} is missing")
    data = ckpt_path.read_bytes()
    if len(data) != meta.get("bytes") or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise CorruptCheckpoint(f"{d}: {CKPT_FILE} does not match the sha256 in {META_FILE} (corrupt or partial)")
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True), meta


def sampling_export(state: dict, extra: dict | None = None) -> bytes:
    """What sampling needs from a training state: weights, EMA weights, U-Net and schedule config."""
    out = {
        "format": FORMAT,
        "model": state["model"],
        "ema": state["ema"],
        "unet": state["unet"],
        "schedule": state["schedule"],
        "objective": state["optim"]["objective"],
        "images_seen": state["counters"]["images_seen"],
        **(extra or {}),
    }
    buf = io.BytesIO()
    torch.save(to_cpu(out), buf)
    return buf.getvalue()


def load_sampling_export(data: bytes | str | Path) -> dict:
    raw = Path(data).read_bytes() if isinstance(data, str | Path) else data
    state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    missing = {"model", "ema", "unet", "schedule", "objective"} - set(state)
    if missing:
        raise CorruptCheckpoint(f"not a ddpm-pipeline sampling checkpoint: missing {sorted(missing)}")
    return state


def model_for_sampling(state: dict, *, ema: bool = True) -> nn.Module:
    """Rebuild the U-Net from a checkpoint dict or sampling export (EMA weights by default), in eval mode."""
    model = UNet(UNetConfig.from_dict(state["unet"]))
    weights = state["ema"]["model"] if ema else state["model"]
    model.load_state_dict(weights)
    return model.eval().requires_grad_(False)
