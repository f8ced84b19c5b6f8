"""The training step and everything it carries between steps; torch only (no Ray, no MLflow).

``TrainState`` holds the raw model, the module to call (DDP/compiled, from ``parallelize``), the
EMA copy, AdamW, the random generator for timesteps and noise, and the counters. Its
``state_dict`` is everything an exact resume needs, made only of tensors and plain values so it
loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipeline.ddpm.ema import EMA
from pipeline.ddpm.loss import diffusion_loss
from pipeline.ddpm.schedule import NoiseSchedule, Objective
from pipeline.ddpm.unet import UNet, UNetConfig
from pipeline.train.parallelize import parallelize


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_images: int = 10_000
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    objective: Objective = "eps"
    precision: str = "fp32"  # "fp32" | "bf16" (autocast; GPU)
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    fused_adamw: bool = False


@dataclass
class StepResult:
    loss_sum: float  # sum of per-sample losses on this rank (NaN if the step was skipped for it)
    images: int  # images this rank used in the step
    grad_norm: float  # global gradient norm before clipping (identical on every rank under DDP)
    applied: bool  # False: non-finite gradients, the optimizer step was skipped
    per_sample: torch.Tensor  # (n,) losses on this rank, cpu
    t: torch.Tensor  # (n,) their timestep indices, cpu
    lr: float


def lr_at(images_seen: int, cfg: OptimConfig) -> float:
    """Linear warm-up over ``warmup_images`` images, then constant (DDPM: 5,000 steps of warm-up)."""
    if cfg.warmup_images <= 0:
        return cfg.lr
    return cfg.lr * min(1.0, (images_seen + 1) / cfg.warmup_images)


class TrainState:
    def __init__(
        self,
        unet: UNetConfig,
        schedule: NoiseSchedule,
        cfg: OptimConfig,
        *,
        device: torch.device | str = "cpu",
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        self.unet_config, self.schedule, self.cfg = unet, schedule, cfg
        self.device, self.seed, self.rank = torch.device(device), seed, rank
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
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=self._fused
        )
        # Timesteps and noise differ per rank but are reproducible: seeded by (seed, rank).
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed * 100_003 + rank)
        self.images_seen = 0
        self.step_count = 0
        self.skipped_steps = 0

    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, micro_batches: list[torch.Tensor]) -> StepResult:
        """One optimizer step over ``micro_batches`` (gradient accumulation; DDP syncs on the last)."""
        lr = lr_at(self.images_seen, self.cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.net.train()
        per_sample, ts, n_total = [], [], sum(b.shape[0] for b in micro_batches)
        for i, x0 in enumerate(micro_batches):
            x0 = x0.to(self.device, non_blocking=True)
            if self.cfg.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.net, "no_sync") else self.net.no_sync()
            with sync:
                with self._autocast():
                    out = diffusion_loss(
                        self.net, self.schedule, x0, objective=self.cfg.objective, generator=self.generator
                    )
                # Weight by micro-batch size so accumulation equals one big batch.
                (out.per_sample.sum() / n_total).backward()
            per_sample.append(out.per_sample.detach())
            ts.append(out.t.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        applied = bool(torch.isfinite(grad_norm))
        if applied:
            self.opt.step()
            self.ema.update(self.model)
        else:
            # Under DDP the gradients are averaged, so every rank sees the same non-finite norm and
            # skips together; the weights are never touched by a NaN.
            self.skipped_steps += 1
        self.opt.zero_grad(set_to_none=True)
        self.step_count += 1
        losses = torch.cat(per_sample).float().cpu()
        return StepResult(
            loss_sum=float(losses.sum()),
            images=n_total,
            grad_norm=float(grad_norm),
            applied=applied,
            per_sample=losses,
            t=torch.cat(ts).cpu(),
            lr=lr,
        )

    # -- checkpoint state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "counters": {
                "images_seen": self.images_seen,
                "step": self.step_count,
                "skipped_steps": self.skipped_steps,
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
        # learning rate is set every step anyway). Fused AdamW wants its step counts on the device.
        for group in self.opt.param_groups:
            group["weight_decay"], group["fused"] = self.cfg.weight_decay, self._fused
            for p in group["params"] if self._fused else ():
                st = self.opt.state.get(p, {})
                if "step" in st:
                    st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
        c = state["counters"]
        self.images_seen, self.step_count = int(c["images_seen"]), int(c["step"])
        self.skipped_steps = int(c["skipped_steps"])
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


def model_for_sampling(state: dict, *, ema: bool = True) -> nn.Module:
    """Rebuild the U-Net from a checkpoint dict (EMA weights by default), in eval mode."""
    model = UNet(UNetConfig.from_dict(state["unet"]))
    weights = state["ema"]["model"] if ema else state["model"]
    model.load_state_dict(weights)
    return model.eval().requires_grad_(False)
