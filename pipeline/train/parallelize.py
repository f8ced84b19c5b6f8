"""Where distribution and compilation are applied to a model: nothing else wraps it."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline.train import dist


def parallelize(
    model: nn.Module,
    device: torch.device,
    *,
    channels_last: bool = False,
    compile: bool = False,
    compile_mode: str = "default",
) -> nn.Module:
    """Move to ``device``; then channels_last, DDP (when torch.distributed is up) and torch.compile.

    Returns the module to call in the training step; the caller keeps the raw model for EMA and
    checkpoints (the raw model's state_dict has no ``module.``/``_orig_mod.`` prefixes).
    """
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    if dist.is_dist():
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    if compile:
        net = torch.compile(net, mode=None if compile_mode == "default" else compile_mode)
    return net
