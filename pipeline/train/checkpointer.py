"""Saving and restoring a worker's whole training state, through the runner's ``Session``.

A checkpoint (``pipeline.checkpoint``: a verified ``images_<N>`` directory) holds
``TrainState.state_dict()``, the reader's position and every rank's random states: resuming from
it continues exactly as if the run had not stopped. Rank 0 writes it and logs the smaller sampling
export to MLflow; every rank reports it. Restoring takes the newest complete checkpoint: rank 0
reads and verifies the candidates, the other ranks load the one it chose.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.checkpoint import (
    CorruptCheckpoint,
    checkpoint_name,
    read_checkpoint,
    sampling_export,
    to_cpu,
    write_checkpoint,
)
from pipeline.train import dist
from pipeline.train.state import TrainState


@dataclass
class Session:
    """What checkpointing needs from the runner (Ray Train, or plain torch.distributed).

    report(metrics, checkpoint_dir, name): every rank calls it at each checkpoint; only rank 0 passes
    a directory. candidates(): checkpoint directories to restore from, newest first (each is read
    and verified; a corrupt one is skipped). ``fetch`` turns a candidate into a local directory.
    """

    report: Callable[[dict, Path | None, str], None]
    candidates: Callable[[], list] = field(default=lambda: [])
    fetch: Callable[[object], Path] = field(default=lambda c: Path(c))


class Checkpointer:
    """``restore()`` and ``save()`` of ``state`` and the ``reader``'s position; ``tracker`` (rank 0's,
    or None) receives the sampling export of every checkpoint."""

    def __init__(self, state: TrainState, reader, session: Session, tracker=None) -> None:
        self.state, self.reader, self.session, self.tracker = state, reader, session, tracker
        self.rank, self.world = dist.rank(), dist.world_size()

    def save(self, metrics: dict | None = None) -> None:
        """Every rank contributes its random states; rank 0 writes and reports the directory."""
        state = self.state
        rng = {"generator": state.generator.get_state(), "torch": torch.get_rng_state()}
        if state.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(state.device)
        all_rng = dist.all_gather_object(rng)
        name = checkpoint_name(state.images_seen)
        metrics = {"images_seen": state.images_seen, "step": state.step_count} | (metrics or {})
        if self.rank != 0:
            self.session.report(metrics, None, name)
            return
        # On the CPU once, for both files.
        full = to_cpu(state.state_dict() | {"reader": self.reader.state_dict(), "rng_per_rank": all_rng})
        tmp = Path(tempfile.mkdtemp(prefix="ddpm-ckpt-"))
        try:
            write_checkpoint(full, tmp / name, meta={"images_seen": state.images_seen, "step": state.step_count})
            if self.tracker:
                self.tracker.log_checkpoint(state.images_seen, sampling_export(full))
            self.session.report(metrics, tmp / name, name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def restore(self) -> str | None:
        """Load the newest complete checkpoint (all ranks agree on which); its path, or None if there is none."""
        # Read on the CPU: random states must stay CPU ByteTensors; load_state_dict moves weights and
        # optimizer moments to the model's device.
        chosen, full = None, None
        if self.rank == 0:
            for cand in self.session.candidates():
                try:
                    full, _ = read_checkpoint(self.session.fetch(cand), map_location="cpu")  # verified as it is read
                    chosen = str(cand)
                    break
                except (CorruptCheckpoint, OSError, RuntimeError) as e:
                    print(f"[train] skipping checkpoint {cand}: {e}", flush=True)
        chosen = dist.broadcast_object(chosen)
        if chosen is None:
            return None
        if full is None:  # the other ranks read the one rank 0 chose
            full, _ = read_checkpoint(self.session.fetch(chosen), map_location="cpu")
        state = self.state
        state.load_state_dict(full, generator=False)
        self._restore_rng(full["rng_per_rank"])
        try:
            self.reader.load_state_dict(full["reader"])
        except ValueError as e:  # e.g. a different number of workers: continue with the next epoch
            self._say(str(e))
            self.reader.load_state_dict({"epoch": full["reader"]["epoch"] + 1, "batch": 0})
        self._say(f"restored {chosen} ({state.images_seen} images seen)")
        return chosen

    def _restore_rng(self, rngs: list[dict]) -> None:
        if len(rngs) != self.world:  # another world size: the per-rank streams cannot continue
            return
        mine, state = rngs[self.rank], self.state
        if not state.set_generator_state(mine["generator"]):
            self._say("the checkpoint's noise generator is another device's: reseeded from the counters")
        torch.set_rng_state(mine["torch"])
        if "cuda" in mine and state.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], state.device)

    def _say(self, message: str) -> None:
        if self.rank == 0:
            print(f"[train] {message}", flush=True)
