"""Reverse-process sampling: Algorithm 2 (ancestral) and DDIM, with one model call per step.

Every image owns a random stream seeded by its own seed (as in NVlabs/edm's generate.py), so the
image for seed s is the same whatever batch it is drawn in and on however many workers.

Fast paths (docs/performance.md) only change how the one model call of a step is executed, never
the maths or the noise streams: ``autocast_dtype`` (bf16 on GPU), ``channels_last``,
``compile_mode`` (torch.compile of the model; "reduce-overhead" adds CUDA graphs) and
``cuda_graph`` (a hand-captured CUDA graph of the model call, ``CUDAGraphModel``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from pipeline.ddpm.schedule import NoiseSchedule, Objective, Variance

Method = Literal["ancestral", "ddim"]

# Noise is drawn per image in blocks of this many steps. It is part of the definition of an image's
# random stream: changing it changes every sample for a given seed.
NOISE_BLOCK = 16


class SeededNoise:
    """Per-image Gaussian streams: x_T first, then one z per noisy step, all from the image's seed.

    Drawing a block of steps per generator call keeps the Python overhead at B calls per
    NOISE_BLOCK steps instead of B calls per step.
    """

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], device: torch.device) -> None:
        self.shape, self.device = tuple(shape), torch.device(device)
        self.generators = []
        for s in seeds:
            g = torch.Generator(device=self.device)
            g.manual_seed(int(s))
            self.generators.append(g)
        self._block: torch.Tensor | None = None
        self._pos = NOISE_BLOCK

    def _draw(self, n: int) -> torch.Tensor:
        per_image = [torch.randn((n, *self.shape), generator=g, device=self.device) for g in self.generators]
        return torch.stack(per_image, dim=1)  # (n, B, C, H, W)

    def initial(self) -> torch.Tensor:
        return self._draw(1)[0]

    def next(self) -> torch.Tensor:
        if self._pos == NOISE_BLOCK:
            self._block, self._pos = self._draw(NOISE_BLOCK), 0
        z = self._block[self._pos]
        self._pos += 1
        return z


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` evenly spaced 0-based indices from T-1 down to 0 (both ends included)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"DDIM steps must be in [1, {num_timesteps}], got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    idx = np.linspace(0, num_timesteps - 1, steps).round().astype(int)
    return sorted(set(idx.tolist()), reverse=True)


@dataclass
class SamplerOptions:
    method: Method = "ancestral"
    steps: int | None = None  # DDIM: number of respaced steps (default 50); ancestral: always T
    eta: float = 0.0  # DDIM only
    variance: Variance = "fixed_small"  # ancestral only
    clip: bool = True
    objective: Objective = "eps"

    def timesteps(self, num_timesteps: int) -> list[int]:
        """The 0-based indices the sampler visits, T-1 first: all of them, or DDIM's respaced ones."""
        if self.method == "ancestral":
            return list(range(num_timesteps - 1, -1, -1))
        if self.method == "ddim":
            return ddim_timesteps(num_timesteps, self.steps or 50)
        raise ValueError(f"unknown sampling method {self.method!r}; expected 'ancestral' or 'ddim'")

    def model_evals(self, num_timesteps: int) -> int:
        return len(self.timesteps(num_timesteps))


class CUDAGraphModel:
    """``model(x, t)`` replayed from one captured CUDA graph (for a fixed batch shape).

    Captured lazily on the first call, for that call's input shape, dtype and memory format and
    the autocast state then in force (with the autocast weight cache off, as CUDA graphs require).
    Later calls copy ``x`` and ``t`` into the static inputs and replay. The returned tensor is the
    graph's static output, overwritten by the next call: consume it first (``sample`` does). The
    weights are read in place, so in-place updates (EMA, ``load_state_dict``) are seen; a model
    moved to new storage needs a new wrapper.
    """

    def __init__(self, model: nn.Module | Callable[[torch.Tensor, torch.Tensor], torch.Tensor], warmup: int = 2):
        self.model, self.warmup = model, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self._x: torch.Tensor | None = None
        self._t: torch.Tensor | None = None
        self._out: torch.Tensor | None = None
        self._autocast: tuple[bool, torch.dtype] | None = None

    @staticmethod
    def _autocast_state() -> tuple[bool, torch.dtype]:
        return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")

    @torch.no_grad()
    def capture(self, x: torch.Tensor, t: torch.Tensor) -> None:
        if x.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device; the sampler runs on {x.device}")
        self._x, self._t = x.clone(), t.clone()
        self._autocast = enabled, dtype = self._autocast_state()
        autocast = lambda: torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side), autocast():
            for _ in range(self.warmup):  # lazy initialisation (cuBLAS/cuDNN workspaces) off the capture
                self.model(self._x, self._t)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # torch.cuda.graph captures on the current device's stream: make that x's device.
        with torch.cuda.device(x.device), torch.cuda.graph(graph), autocast():
            self._out = self.model(self._x, self._t)
        self.graph = graph

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            self.capture(x, t)
        assert self._x is not None and self._t is not None and self._out is not None
        if x.shape != self._x.shape or x.dtype != self._x.dtype or t.shape != self._t.shape:
            raise ValueError(
                f"CUDAGraphModel was captured for x of shape {tuple(self._x.shape)} ({self._x.dtype}); got "
                f"{tuple(x.shape)} ({x.dtype}): use one wrapper per batch shape"
            )
        if self._autocast_state() != self._autocast:
            raise ValueError(
                f"CUDAGraphModel was captured under autocast {self._autocast}; now {self._autocast_state()}"
            )
        self._x.copy_(x)
        self._t.copy_(t)
        self.graph.replay()
        return self._out


def _uses_cudagraph_trees(compile_mode: str | None) -> bool:
    return compile_mode in ("reduce-overhead", "max-autotune")


@torch.no_grad()
def sample(
    model: nn.Module | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    seeds: Sequence[int],
    shape: Sequence[int],
    options: SamplerOptions | None = None,
    *,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = False,
    compile_mode: str | None = None,
    compile_backend: str = "inductor",
    cuda_graph: bool = False,
) -> torch.Tensor:
    """Images for ``seeds`` (one per seed), shape (len(seeds), *shape), float32, clamped to [-1, 1].

    ``channels_last`` puts x in that memory format (convert the model yourself:
    ``model.to(memory_format=torch.channels_last)``). ``compile_mode`` ("default",
    "reduce-overhead", "max-autotune", ...) wraps the model in ``torch.compile`` with
    ``compile_backend``; dynamo's cache is keyed on the model, so a second call does not
    recompile. ``cuda_graph`` replays the model call from a CUDA graph captured at the first step
    (``CUDAGraphModel``; pass a ``CUDAGraphModel`` as ``model`` instead to capture once for many
    calls). Neither changes the maths, the one model call per step or the per-seed noise.
    """
    opts = options or SamplerOptions()
    device = torch.device(device)
    if cuda_graph and compile_mode is not None:
        raise ValueError(
            "choose cuda_graph or compile_mode, not both (compile_mode='reduce-overhead' uses CUDA graphs)"
        )
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got {device}")
    if compile_mode is not None:
        mode = None if compile_mode == "default" else compile_mode
        model = torch.compile(model, mode=mode, backend=compile_backend)
    elif cuda_graph:
        model = CUDAGraphModel(model)
    mark_step = _uses_cudagraph_trees(compile_mode)
    noise = SeededNoise(seeds, shape, device)
    x = noise.initial()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    b = x.shape[0]

    ts = opts.timesteps(schedule.num_timesteps)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ts), desc=f"sampling ({opts.method})", leave=False)
    t_batch = torch.empty(b, dtype=torch.long, device=device)
    for i, t in enumerate(ts):
        t_batch.fill_(t)
        if mark_step:  # the previous step's outputs are consumed: cudagraph trees may reuse them
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(x, t_batch)  # the one model evaluation of this step
        out = out.float()
        if opts.method == "ancestral":
            z = noise.next() if t > 0 else None
            x = schedule.step(out, t, x, z, objective=opts.objective, variance=opts.variance, clip=opts.clip)
        else:
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            z = noise.next() if (opts.eta > 0 and t_prev >= 0) else None
            x = schedule.ddim_step(out, t, t_prev, x, z, eta=opts.eta, objective=opts.objective, clip=opts.clip)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return x.float().clamp(-1.0, 1.0).contiguous()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float (B, C, H, W) -> uint8 (B, H, W, C)."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
