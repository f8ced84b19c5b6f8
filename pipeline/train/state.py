"""The training step and everything it carries between steps; torch only (no Ray, no MLflow).

``TrainState`` holds the raw model, the module to call (DDP/compiled, from ``parallelize``), the
EMA copy, AdamW, the random generator for timesteps and noise, and the counters. Its
``state_dict`` is everything an exact resume needs, made only of tensors and plain values so it
loads with ``torch.load(weights_only=True)``.

A step whose gradient norm is not finite changes nothing but the counters. ``train_step`` never
waits for the device to say so: on a GPU the optimizer step and the EMA update always run and are
masked by the finite flag on the device, so the host can queue the next step at once. On a CPU,
where reading a value costs nothing, the skip is a plain branch. Both leave the same weights, EMA,
optimizer state and counters (``tests/unit/train/test_state.py`` checks it on the CPU).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipeline.ddpm.ema import EMA
from pipeline.ddpm.loss import Weighting, diffusion_loss, draw_noise
from pipeline.ddpm.schedule import NoiseSchedule, Objective
from pipeline.ddpm.unet import UNet, UNetConfig
from pipeline.train.parallelize import parallelize


@dataclass
class OptimConfig:
    """The optimizer's and the step's settings: ``TrainConfig``'s fields of these names (the training
    job derives it, ``pipeline.train.loop.optim_config``) plus the objective; the defaults are the
    same (tested), for callers without the settings (benchmarks)."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_images: int = 10_000
    lr_schedule: str = "constant"  # "constant" | "cosine" (to min_lr_ratio * lr at total_images)
    min_lr_ratio: float = 0.0
    total_images: int = 200_000  # the cosine's end
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    objective: Objective = "eps"
    loss_weighting: Weighting = "uniform"
    min_snr_gamma: float = 5.0
    precision: str = "fp32"  # "fp32" | "bf16" (autocast; GPU)
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    fused_adamw: bool = False


@dataclass
class StepResult:
    """One optimizer step, as tensors on the device; reading them waits for the step to finish."""

    per_sample: torch.Tensor  # (n,) float32 losses on this rank
    t: torch.Tensor  # (n,) their timestep indices
    norm: torch.Tensor  # global gradient norm before clipping (identical on every rank under DDP)
    finite: torch.Tensor  # bool; False: the step was skipped
    images: int  # images this rank used in the step
    lr: float

    # Host values, for callers that read every step anyway (the training loop reads the tensors only
    # at log steps).
    @property
    def loss_sum(self) -> float:
        return float(self.per_sample.sum())

    @property
    def grad_norm(self) -> float:
        return float(self.norm)

    @property
    def applied(self) -> bool:
        return bool(self.finite)


def lr_at(images_seen: int, cfg: OptimConfig) -> float:
    """Linear warm-up over ``warmup_images`` images (DDPM: 5,000 steps of warm-up), then constant, or a
    half cosine from ``lr`` down to ``min_lr_ratio * lr`` at ``total_images`` (SGDR, Loshchilov &
    Hutter 2017, eq. 5, one cycle). A function of the images seen only, so a resumed or resized run
    follows the same curve."""
    if images_seen < cfg.warmup_images:
        return cfg.lr * (images_seen + 1) / cfg.warmup_images
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule != "cosine":
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}; expected 'constant' or 'cosine'")
    if cfg.total_images <= cfg.warmup_images:  # the settings refuse it first (TrainConfig), naming the flags
        raise ValueError(
            f"lr_schedule='cosine' needs total_images ({cfg.total_images}) > warmup_images ({cfg.warmup_images})"
        )
    done = min(1.0, (images_seen - cfg.warmup_images) / (cfg.total_images - cfg.warmup_images))
    low = cfg.min_lr_ratio * cfg.lr
    return low + (cfg.lr - low) * 0.5 * (1.0 + math.cos(math.pi * done))


class TrainState:
    """``skip_on_host``: decide a non-finite step with a host branch (True) or mask it on the device
    (False); None: the branch on a CPU, the mask elsewhere. The counters ``images_seen`` and
    ``samples_skipped`` are the loop's to advance; ``skipped_steps`` is a tensor on the device."""

    def __init__(
        self,
        unet: UNetConfig,
        schedule: NoiseSchedule,
        cfg: OptimConfig,
        *,
        device: torch.device | str = "cpu",
        seed: int = 0,
        rank: int = 0,
        skip_on_host: bool | None = None,
    ) -> None:
        self.unet_config, self.schedule, self.cfg = unet, schedule, cfg
        self.device, self.seed, self.rank = torch.device(device), seed, rank
        self.skip_on_host = self.device.type == "cpu" if skip_on_host is None else skip_on_host
        torch.manual_seed(seed)  # the same initial weights on every rank
        self.model = UNet(unet)
        self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_warmup)
        # ...but not the same dropout masks: the global generators drive dropout, so seed them per rank.
        torch.manual_seed(seed * 100_003 + rank + 7_919)
        self.net = parallelize(
            self.model,
            self.device,
            channels_last=cfg.channels_last,
            compile=cfg.compile,
            compile_mode=cfg.compile_mode,
        )
        self.ema.model.to(self.device)
        self._fused = (cfg.fused_adamw and self.device.type == "cuda") or None
        # The mask needs AdamW's step counts on the device too (fused AdamW keeps them there anyway).
        self._capturable = not self.skip_on_host and self.device.type == "cuda" and not self._fused
        self.opt = torch.optim.AdamW(
            self.model.parameters(),
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            fused=self._fused,
            capturable=self._capturable,
        )
        self._saved: list[torch.Tensor] = []  # scratch copies for the masked step
        # Timesteps and noise differ per rank but are reproducible: seeded by (seed, rank).
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed * 100_003 + rank)
        self.images_seen = 0
        self.samples_skipped = 0  # bad data samples the reader dropped, over all ranks
        self.step_count = 0
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=self.device)

    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(
        self,
        micro_batches: list[torch.Tensor],
        *,
        draws: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        denominator: float | None = None,
    ) -> StepResult:
        """One optimizer step over ``micro_batches`` (gradient accumulation; DDP syncs on the last).

        ``draws``: each micro-batch's (t, noise), drawn by the caller (``keyed_draws``) instead of from
        this rank's generator. ``denominator``: what this rank's loss sum is divided by (default its own
        images); DDP then averages over ranks, so ``global images / world size`` makes the gradient the
        mean over the global batch however unevenly it is spread over the ranks."""
        lr = lr_at(self.images_seen, self.cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.net.train()
        per_sample, ts, n_total = [], [], sum(b.shape[0] for b in micro_batches)
        scale = denominator or n_total
        for i, x0 in enumerate(micro_batches):
            x0 = x0.to(self.device, non_blocking=True)
            if self.cfg.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.net, "no_sync") else self.net.no_sync()
            with sync:
                with self._autocast():
                    out = diffusion_loss(
                        self.net,
                        self.schedule,
                        x0,
                        objective=self.cfg.objective,
                        weighting=self.cfg.loss_weighting,
                        min_snr_gamma=self.cfg.min_snr_gamma,
                        generator=self.generator,
                        draws=None if draws is None else draws[i],
                    )
                # Weight by micro-batch size so accumulation equals one big batch.
                (out.per_sample.sum() / scale).backward()
            per_sample.append(out.per_sample.detach())
            ts.append(out.t.detach())
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        # Under DDP the gradients are averaged, so every rank sees the same norm and skips together;
        # the weights are never touched by a NaN.
        finite = torch.isfinite(norm)
        # AdamW creates a parameter's state at its first step, and a skipped first step must create
        # none: that one step is decided on the host.
        if self.skip_on_host or any(p.grad is not None and p not in self.opt.state for p in self.model.parameters()):
            if finite:
                self.opt.step()
                self.ema.update(self.model)
        else:
            self._masked_update(finite)
        self.skipped_steps += ~finite
        self.opt.zero_grad(set_to_none=True)
        self.step_count += 1
        return StepResult(torch.cat(per_sample).float(), torch.cat(ts), norm, finite, n_total, lr)

    def keyed_draws(self, shape: torch.Size, sizes: list[int], seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The (t, noise) of a batch of ``shape`` made of pieces of ``sizes``, each piece's drawn from the
        generator seeded by its seed: a sample's noise then depends on where it is in the global batch,
        not on which rank or micro-batch trains it. Returns (B,) timesteps and (B, C, H, W) noise."""
        parts = []
        for n, seed in zip(sizes, seeds, strict=True):
            self.generator.manual_seed(seed)
            parts.append(draw_noise(self.schedule, (n, *shape[1:]), self.device, generator=self.generator))
        return torch.cat([t for t, _ in parts]), torch.cat([e for _, e in parts])

    @torch.no_grad()
    def _masked_update(self, finite: torch.Tensor) -> None:
        """``opt.step()`` and ``ema.update()``, leaving every value exactly as it was unless ``finite``."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        for p in params:  # zero gradients keep the update that gets thrown away finite
            p.grad.masked_fill_(~finite, 0.0)
        live = params + [v for p in params for v in self.opt.state[p].values() if torch.is_tensor(v)]
        if len(self._saved) != len(live):
            self._saved = [torch.empty_like(v) for v in live]
        torch._foreach_copy_(self._saved, live)
        self.opt.step()
        # lerp by 0 keeps the new value and by 1 takes the saved one, both exactly (all are finite).
        torch._foreach_lerp_(live, self._saved, (~finite).float())
        _masked_ema_update(self.ema, self.model, finite)

    # -- checkpoint state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() | {"num_updates": int(self.ema.num_updates)},
            "optimizer": self.opt.state_dict(),
            "counters": {
                "images_seen": self.images_seen,
                "step": self.step_count,
                "skipped_steps": int(self.skipped_steps),
                "samples_skipped": self.samples_skipped,
            },
            "generator": self.generator.get_state(),
            "unet": self.unet_config.to_dict(),
            "schedule": self.schedule.to_dict(),
            "optim": asdict(self.cfg),
        }

    def load_state_dict(self, state: dict, *, generator: bool = True) -> None:
        if state["unet"] != self.unet_config.to_dict():
            raise ValueError(
                f"checkpoint was made for a different U-Net: {state['unet']} vs configured {self.unet_config.to_dict()}"
            )
        if state["schedule"] != self.schedule.to_dict():
            raise ValueError(
                f"checkpoint was made with a different noise schedule: {state['schedule']} vs {self.schedule.to_dict()}"
            )
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        # load_state_dict brings back the saved run's hyperparameters; this run's config wins (the
        # learning rate is set every step anyway). Fused and capturable AdamW want their step counts
        # on the device.
        on_device = self._fused or self._capturable
        for group in self.opt.param_groups:
            group["weight_decay"], group["fused"], group["capturable"] = (
                self.cfg.weight_decay,
                self._fused,
                self._capturable,
            )
            for p in group["params"] if on_device else ():
                st = self.opt.state.get(p, {})
                if "step" in st:
                    st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
        c = state["counters"]
        self.images_seen, self.step_count = int(c["images_seen"]), int(c["step"])
        self.samples_skipped = int(c.get("samples_skipped", 0))
        self.skipped_steps = torch.tensor(int(c["skipped_steps"]), device=self.device)
        if generator:
            self.set_generator_state(state["generator"])

    def set_generator_state(self, saved: torch.Tensor) -> bool:
        """Restore the timestep/noise generator; False (and a reseed from the counters) when the
        state comes from another kind of device (a CUDA generator's state is not a CPU one's)."""
        if saved.numel() == self.generator.get_state().numel():
            self.generator.set_state(saved.cpu())
            return True
        self.generator.manual_seed((self.seed * 1_000_003 + self.images_seen) * 100_003 + self.rank + 1)
        return False


@torch.no_grad()
def _masked_ema_update(ema: EMA, model: nn.Module, applied: torch.Tensor) -> None:
    """``ema.update(model)`` if ``applied``, else nothing, with the decay worked out on the device:
    ``ema.num_updates`` becomes a device tensor."""
    n = torch.as_tensor(ema.num_updates, dtype=torch.int64, device=applied.device)
    decay = torch.full((), ema.decay, dtype=torch.float64, device=applied.device)
    if ema.warmup:
        decay = torch.minimum(decay, (1 + n.double()) / (10 + n.double()))
    weight = ((1.0 - decay) * applied).float()  # as EMA.update: computed in float64, used in float32
    torch._foreach_lerp_(list(ema.model.parameters()), [p.detach() for p in model.parameters()], weight)
    for eb, b in zip(ema.model.buffers(), model.buffers(), strict=True):
        eb.copy_(torch.where(applied, b, eb))
    ema.num_updates = n + applied
