"""Saving and restoring a worker's whole training state, through the runner's ``Session``.

A checkpoint (``pipeline.checkpoint``: a verified ``images_<N>`` directory) holds
``TrainState.state_dict()``, the reader's position and every rank's random states: resuming from
it continues exactly as if the run had not stopped. Rank 0 writes it and logs the smaller sampling
export to MLflow; every rank reports it. Restoring takes the newest complete checkpoint: rank 0
reads and verifies the candidates, the other ranks load the one it chose.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.checkpoint import (
    META_FILE,
    CorruptCheckpoint,
    checkpoint_name,
    parse_name,
    read_checkpoint,
    sampling_export,
    to_cpu,
    write_checkpoint,
)
from pipeline.scratch import scratch_dir
from pipeline.train import dist
from pipeline.train.failures import NotRetryable
from pipeline.train.state import TrainState


@dataclass
class Session:
    """What checkpointing needs from the runner (Ray Train, or plain torch.distributed).

    report(metrics, checkpoint_dir, name): every rank calls it at each checkpoint (only rank 0 passes
    a directory) and at each validation (metrics only). candidates(): checkpoint directories to restore from, newest first (each is read
    and verified; an unusable one is skipped and passed to ``unusable``, so that retention does not
    count it as one of the checkpoints kept). ``fetch`` turns a candidate into a local directory.
    """

    report: Callable[[dict, Path | None, str], None]
    candidates: Callable[[], list] = field(default=lambda: [])
    fetch: Callable[[object], Path] = field(default=lambda c: Path(c))
    unusable: Callable[[object], None] = field(default=lambda c: None)


class Checkpointer:
    """``restore()`` and ``save()`` of ``state`` and the ``reader``'s position; ``tracker`` (rank 0's,
    or None) receives the sampling export of every checkpoint."""

    def __init__(self, state: TrainState, reader, session: Session, tracker=None) -> None:
        self.state, self.reader, self.session, self.tracker = state, reader, session, tracker
        self.rank, self.world = dist.rank(), dist.world_size()
        self.generation = 0  # of the names this run writes; set by restore()
        self.saved_world: int | None = None  # world size of the restored checkpoint's writer

    def save(self, metrics: dict | None = None) -> None:
        """Every rank contributes its random states; rank 0 writes and reports the directory."""
        state = self.state
        rng = {"generator": state.generator.get_state(), "torch": torch.get_rng_state()}
        if state.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(state.device)
        all_rng = dist.all_gather_object(rng)
        name = checkpoint_name(state.images_seen, self.generation)
        metrics = {"images_seen": state.images_seen, "step": state.step_count} | (metrics or {})
        if self.rank != 0:
            self.session.report(metrics, None, name)
            return
        # On the CPU once, for both files.
        full = to_cpu(state.state_dict() | {"reader": self.reader.state_dict(), "rng_per_rank": all_rng})
        tmp = scratch_dir("ckpt")
        try:
            write_checkpoint(full, tmp / name, meta={"images_seen": state.images_seen, "step": state.step_count})
            if self.tracker:
                self.tracker.log_checkpoint(state.images_seen, sampling_export(full))
            self.session.report(metrics, tmp / name, name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def restore(self) -> str | None:
        """Load the newest checkpoint that verifies and loads (all ranks agree on which); its path, or
        None if the run has none yet.

        A candidate that cannot be verified *and* loaded (incomplete, corrupt, not our format, a pickle
        payload, another model's shapes or keys) is unusable: it is logged, reported to the session
        and skipped. After skipping one, the run continues in a new checkpoint generation, so it never
        writes a name that storage already holds. If the run has complete checkpoints but none of
        them loads, that is ``NotRetryable``: a restart would find the same files. Storage errors
        while fetching are not the checkpoint's fault and propagate (the worker group restarts)."""
        chosen, full, generation = None, None, 0
        if self.rank == 0:
            chosen, full, generation = self._choose()
        chosen, generation = dist.broadcast_object((chosen, generation))
        self.generation = generation
        if chosen is None:
            return None
        state = self.state
        if full is None:  # the other ranks load the one rank 0 chose (and could load)
            full, _ = read_checkpoint(self.session.fetch(chosen), map_location="cpu")
            state.load_state_dict(full, generator=False)
        self._restore_rng(full["rng_per_rank"])
        self.saved_world = len(full["rng_per_rank"])  # the world size that wrote it (one entry per rank)
        try:
            self.reader.load_state_dict(full["reader"])
        except ValueError as e:  # e.g. a different number of workers: continue with the next epoch
            self._say(str(e))
            self.reader.load_state_dict({"epoch": full["reader"]["epoch"] + 1, "batch": 0})
        self._say(f"restored {chosen} ({state.images_seen} images seen)")
        return chosen

    def _choose(self) -> tuple[str | None, dict | None, int]:
        """Rank 0: (candidate, its contents, generation to write in), the contents already loaded into
        the state. Read on the CPU: random states must stay CPU ByteTensors; load_state_dict moves
        weights and optimizer moments to the model's device."""
        candidates = list(self.session.candidates())
        newest = max((parse_name(Path(str(c)).name) or (0, 0) for c in candidates), default=(0, 0))
        pristine = None
        skipped: list[str] = []
        complete_but_unusable = False
        for cand in candidates:
            local = self.session.fetch(cand)
            try:
                full, _ = read_checkpoint(local, map_location="cpu")  # verified as it is read
                _check_layout(full)
                if pristine is None:
                    pristine = copy.deepcopy(self.state.state_dict())
                self.state.load_state_dict(full, generator=False)
            except Exception as e:  # noqa: BLE001 - untrusted bytes: any failure makes it unusable
                if pristine is not None:  # a half-done load must not leak into the next candidate
                    self.state.load_state_dict(pristine, generator=False)
                complete_but_unusable |= (Path(local) / META_FILE).is_file()
                skipped.append(f"{Path(str(cand)).name}: {type(e).__name__}: {e}")
                print(f"[train] unusable checkpoint {cand}, skipped: {type(e).__name__}: {e}", flush=True)
                self.session.unusable(cand)
                continue
            gen = (parse_name(Path(str(cand)).name) or (0, 0))[0]
            return str(cand), full, newest[0] + 1 if skipped else gen
        if complete_but_unusable:
            raise NotRetryable(
                f"none of the run's {len(candidates)} checkpoint(s) can be loaded ({'; '.join(skipped)}); "
                "fix or remove them, or start a new run under another --train.run-name"
            )
        return None, None, newest[0] + 1 if skipped else 0

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


REQUIRED = {"model", "ema", "optimizer", "counters", "unet", "schedule", "reader", "rng_per_rank"}


def _check_layout(full: object) -> None:
    """The top level of a training checkpoint; loading checks the rest (shapes, keys, configs)."""
    if not isinstance(full, dict):
        raise CorruptCheckpoint(f"not a training checkpoint (a {type(full).__name__}, not a dict)")
    if missing := REQUIRED - set(full):
        raise CorruptCheckpoint(f"not a training checkpoint: missing {sorted(missing)}")
