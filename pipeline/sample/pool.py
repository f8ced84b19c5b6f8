"""Seed-addressed sampling over a pool of Ray actors, results streamed back batch by batch.

The seed range is cut into batches (``make_batches``); a pool of actors (one GPU each where the
cluster has GPUs, else ``num_cpus=threads`` with ``torch.set_num_threads(threads)``) each load the
weights once, from one ``ray.put`` of the checkpoint bytes, and sample the batches they are handed.
Since every image has its own random stream (``pipeline.ddpm.sampler``), the image of a seed does not
depend on the batch it lands in, the batch size or the number of actors.

Batches are handed out once every requested actor is ready, so that each takes part: on a cluster an
actor on another host (runtime-env download, torch import) can start tens of seconds after one on the
driver's host, which would otherwise sample everything alone. The wait is bounded by
``start_timeout_s``: after it the ready actors start and the late ones join when they come; with none
ready the pool fails, naming what an actor needs and what the cluster has free.

The driver keeps at most ``depth`` batches in flight per actor, takes results with ``ray.wait`` as
they finish and hands each one to a callback (which writes it out): no process holds all images. If
an actor dies (``RayActorError``), its unfinished batches go back to the front of the queue and a
replacement actor is started (up to ``max_failures`` times); a batch is delivered exactly once.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.checkpoint import load_sampling_export, model_for_sampling
from pipeline.ddpm.sampler import SamplerOptions, sample, to_uint8
from pipeline.ddpm.schedule import NoiseSchedule
from pipeline.ddpm.unet import UNetConfig


class PoolError(RuntimeError):
    """The pool cannot finish: no actor could start, too many died, or sampling itself failed."""


# ------------------------------------------------------------------------------------------------
# Batches


@dataclass(frozen=True)
class SeedBatch:
    """Consecutive seeds handed to one actor in one task; ``start`` places their images in the output."""

    index: int
    start: int  # row of its first image in the output
    seeds: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.seeds)


def make_batches(first_seed: int, num_images: int, batch_size: int) -> list[SeedBatch]:
    """Seeds first_seed .. first_seed + num_images - 1, in order, cut into batches."""
    out = []
    for i, start in enumerate(range(0, num_images, batch_size)):
        n = min(batch_size, num_images - start)
        out.append(SeedBatch(i, start, tuple(range(first_seed + start, first_seed + start + n))))
    return out


# ------------------------------------------------------------------------------------------------
# The actor


class FixedShapeCalls:
    """``model(x, t)`` evaluated in calls of exactly ``chunk`` images (the last chunk padded).

    Batched kernels are not bitwise batch-invariant: on this CPU a U-Net call on 1-15 images
    differs from the same images in a larger batch by ~1e-6, which after tens of steps can move a
    pixel across a uint8 rounding boundary. With every call the same shape, an image's arithmetic
    does not depend on which batch it is in or where, so the same seed gives the same bytes whatever
    the batch size or the number of workers (on the same kind of device).
    """

    def __init__(self, model, chunk: int) -> None:
        self.model, self.chunk = model, chunk

    def __call__(self, x, t):
        n, c = x.shape[0], self.chunk
        if n == c:
            return self.model(x, t)
        outs = []
        for i in range(0, n, c):
            xi, ti = x[i : i + c], t[i : i + c]
            k = xi.shape[0]
            if k < c:
                xi = torch.cat([xi, xi[-1:].expand(c - k, *xi.shape[1:])])
                ti = torch.cat([ti, ti[-1:].expand(c - k)])
            outs.append(self.model(xi, ti)[:k])
        return torch.cat(outs)


class SamplerWorker:
    """One sampling actor: loads the weights once, then samples the batches it is given."""

    def __init__(
        self, export: bytes, *, ema: bool, options: SamplerOptions, threads: int, use_gpu: bool, chunk: int
    ) -> None:
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        state = load_sampling_export(export)
        self.model = model_for_sampling(state, ema=ema).to(self.device)
        self.schedule = NoiseSchedule.from_dict(state["schedule"])
        unet = UNetConfig.from_dict(state["unet"])
        self.shape = (unet.in_channels, unet.image_size, unet.image_size)
        self.options = options
        self.threads = threads
        self.call = FixedShapeCalls(self.model, chunk)

    def info(self) -> dict[str, Any]:
        import socket

        import ray

        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_ip": ray.util.get_node_ip_address(),  # hosts can share a hostname (containers, namespaces)
            "device": str(self.device),
            "threads": torch.get_num_threads(),
        }

    def sample(self, seeds: Sequence[int]) -> tuple[np.ndarray, float, float]:
        """(uint8 NHWC images, wall seconds, CPU seconds of this process)."""
        t0, c0 = time.perf_counter(), time.process_time()
        x = sample(self.call, self.schedule, list(seeds), self.shape, self.options, device=self.device)
        return to_uint8(x), time.perf_counter() - t0, time.process_time() - c0


@dataclass
class _Slot:
    handle: Any
    number: int
    ready: bool = False
    alive: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    inflight: dict[Any, SeedBatch] = field(default_factory=dict)  # ObjectRef -> batch
    batches: int = 0
    busy_s: float = 0.0
    cpu_s: float = 0.0


def start_sampling(ready: int, starting: int, waited_s: float, timeout_s: float) -> bool:
    """Whether to hand out batches: every live actor is ready, or the wait is over and some are.

    Raises ``TimeoutError`` when the wait is over and no actor is ready.
    """
    if ready and not starting:
        return True
    if waited_s <= timeout_s:
        return False
    if not ready:
        raise TimeoutError(f"no sampling actor started within {timeout_s:.0f} s")
    return True


@dataclass
class PoolStats:
    actor_failures: int
    resubmitted_batches: int
    startup_s: float  # until every actor was ready (or the wait for them ended)
    sampling_s: float  # from then to the last batch received
    actor_cpu_s: float  # CPU time the actors spent in delivered batches
    per_actor: list[dict[str, Any]]
    device: str


class SamplingPool:
    """A pool of ``SamplerWorker`` actors fed from a queue of batches; see the module docstring."""

    def __init__(
        self,
        export: bytes,
        *,
        ema: bool,
        options: SamplerOptions,
        workers: int,
        use_gpu: bool,
        threads: int = 1,
        chunk: int,
        max_failures: int = 2,
        depth: int = 2,
        start_timeout_s: float = 300.0,
        log: Callable[[str], None] = print,
    ) -> None:
        import ray

        self._ray = ray
        self.export_ref = ray.put(export)  # once; every actor reads the same object
        self.ema, self.options, self.workers = ema, options, workers
        self.use_gpu, self.threads, self.chunk = use_gpu, threads, chunk
        self.max_failures, self.depth, self.start_timeout_s = max_failures, depth, start_timeout_s
        self.log = log
        self.slots: list[_Slot] = []
        self.failures = 0
        self.resubmitted = 0
        self._refs: dict[Any, tuple[_Slot, SeedBatch | None]] = {}
        resources = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": threads}
        self._actor_cls = ray.remote(**resources, max_restarts=0, max_task_retries=0)(SamplerWorker)

    # -- actors ------------------------------------------------------------------------------------
    def _start_actor(self) -> _Slot:
        handle = self._actor_cls.remote(
            self.export_ref,
            ema=self.ema,
            options=self.options,
            threads=self.threads,
            use_gpu=self.use_gpu,
            chunk=self.chunk,
        )
        slot = _Slot(handle=handle, number=len(self.slots))
        self.slots.append(slot)
        self._refs[handle.info.remote()] = (slot, None)
        return slot

    @property
    def alive(self) -> list[_Slot]:
        return [s for s in self.slots if s.alive]

    def _actor_died(self, slot: _Slot, err: Exception, pending: deque[SeedBatch], done: set[int]) -> None:
        if not slot.alive:
            return
        slot.alive = False
        self.failures += 1
        lost = [b for b in slot.inflight.values() if b.index not in done]
        for ref in list(slot.inflight):
            self._refs.pop(ref, None)
        slot.inflight.clear()
        for b in sorted(lost, key=lambda b: b.index, reverse=True):
            pending.appendleft(b)
        self.resubmitted += len(lost)
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        self.log(
            f"sampling actor {slot.number} (pid {slot.info.get('pid', '?')}) died ({first_line[:200]}); "
            f"{len(lost)} batch(es) go to other actors"
        )
        with contextlib.suppress(Exception):
            self._ray.kill(slot.handle)
        if self.failures <= self.max_failures:
            new = self._start_actor()
            self.log(f"started replacement actor {new.number} ({self.failures}/{self.max_failures} failures)")
        elif not self.alive:
            raise PoolError(
                f"every sampling actor died ({self.failures} failures, cluster.max_failures={self.max_failures}); "
                f"last error: {first_line}"
            )

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, batches: Sequence[SeedBatch], on_result: Callable[[SeedBatch, np.ndarray], None]) -> PoolStats:
        """Sample every batch; ``on_result(batch, uint8 NHWC images)`` once per batch, as results arrive."""
        t_start = time.perf_counter()
        for _ in range(self.workers):
            self._start_actor()
        pending: deque[SeedBatch] = deque(batches)
        done: set[int] = set()
        t_sampling: float | None = None  # when batches started to be handed out
        while len(done) < len(batches):
            if t_sampling is None and self._may_start(time.perf_counter() - t_start):
                t_sampling = time.perf_counter()
            for slot in self.alive if t_sampling is not None else ():
                while slot.ready and pending and len(slot.inflight) < self.depth:
                    b = pending.popleft()
                    ref = slot.handle.sample.remote(b.seeds)
                    slot.inflight[ref] = b
                    self._refs[ref] = (slot, b)
            if not self._refs:
                raise PoolError("internal error: batches left but nothing in flight")
            ready, _ = self._ray.wait(list(self._refs), num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in self._refs:  # else dropped when its actor died
                    self._receive(ref, pending, done, on_result)
        t_end = time.perf_counter()
        return PoolStats(
            actor_failures=self.failures,
            resubmitted_batches=self.resubmitted,
            startup_s=(t_sampling or t_end) - t_start,
            sampling_s=t_end - (t_sampling or t_start),
            actor_cpu_s=sum(s.cpu_s for s in self.slots),
            per_actor=[
                {
                    "actor": s.number,
                    **s.info,
                    "alive": s.alive,
                    "batches": s.batches,
                    "busy_s": round(s.busy_s, 3),
                    "cpu_s": round(s.cpu_s, 3),
                }
                for s in self.slots
            ],
            device=next((s.info.get("device", "?") for s in self.slots if s.info), "?"),
        )

    def _may_start(self, waited_s: float) -> bool:
        """Whether to hand out batches now (``start_sampling``), saying so when late actors are left behind."""
        ready = sum(s.ready for s in self.alive)
        starting = len(self.alive) - ready
        try:
            go = start_sampling(ready, starting, waited_s, self.start_timeout_s)
        except TimeoutError as e:
            raise PoolError(f"{e}: {self._needs_and_free()}") from None
        if go and starting:
            self.log(
                f"{starting} of {len(self.alive)} sampling actors not ready after {self.start_timeout_s:.0f} s; "
                f"sampling starts with {ready}, the others join when they start ({self._needs_and_free()})"
            )
        return go

    def _receive(
        self, ref: Any, pending: deque[SeedBatch], done: set[int], on_result: Callable[[SeedBatch, np.ndarray], None]
    ) -> None:
        """One finished task: an actor's start (its info) or a batch's images, or the death of its actor."""
        from ray.exceptions import RayActorError, RayTaskError

        slot, batch = self._refs.pop(ref)
        try:
            value = self._ray.get(ref)
        except RayActorError as e:
            self._actor_died(slot, e, pending, done)
            return
        except RayTaskError as e:
            raise PoolError(f"sampling failed in actor {slot.number}: {e}") from None
        if batch is None:
            slot.ready, slot.info = True, value
            return
        slot.inflight.pop(ref, None)
        images, seconds, cpu_seconds = value
        slot.batches += 1
        slot.busy_s += seconds
        slot.cpu_s += cpu_seconds
        if batch.index in done:  # cannot happen: a batch is re-queued only after its actor died
            return
        if images.shape[0] != len(batch):
            raise PoolError(f"batch {batch.index}: got {images.shape[0]} images for {len(batch)} seeds")
        done.add(batch.index)
        on_result(batch, images)

    def _needs_and_free(self) -> str:
        res = self._ray.available_resources()
        need = "1 GPU" if self.use_gpu else f"{self.threads} CPU(s)"
        return f"each needs {need}; the cluster has {res.get('CPU', 0):g} CPUs and {res.get('GPU', 0):g} GPUs free"

    def shutdown(self) -> None:
        for s in self.slots:
            with contextlib.suppress(Exception):
                self._ray.kill(s.handle)
        self.slots = []
        self._refs.clear()
