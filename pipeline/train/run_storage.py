"""A training run's checkpoints in storage (S3 through pyarrow, or a local directory): listing,
fetching, uploading and retention, each riding through storage outages (``storage.outage_s``).

The checkpoints are ours, not Ray Train's: Ray's checkpoint manager writes its own snapshot to
storage on every reported checkpoint and deletes old ones itself, and an outage at either moment is a
controller error it never retries. So workers report only metrics to Ray; rank 0 uploads each
checkpoint here (``checkpoint.pt`` first, ``meta.json`` last, so a partial upload is never taken for
a whole one) and then applies retention: keep the newest ``keep`` usable checkpoints, delete the
rest, best-effort (a failure is logged and the next retention tries again).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipeline.checkpoint import META_FILE, parse_name
from pipeline.data.storage import filesystem, ride_out
from pipeline.scratch import scratch_dir


class RunStorage:
    def __init__(self, settings: Any, run_name: str, cache_root: str | Path) -> None:
        self.storage = settings.storage
        self.fs, root = filesystem(settings.storage.checkpoint_url, settings.storage)
        self.path = f"{root}/{run_name}"
        self.cache_root, self._cache = Path(cache_root), None
        self.unusable: set[str] = set()  # names restore() skipped: never counted as kept

    def candidates(self) -> list[str]:
        """Checkpoint directories of the run, newest first: by generation, then images seen."""
        import pyarrow.fs as pafs

        def listing() -> list:
            return self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))

        infos = ride_out(f"listing the checkpoints under {self.path}", listing, self.storage)
        dirs = [i.path for i in infos if i.type == pafs.FileType.Directory and parse_name(i.base_name)]
        return sorted(dirs, key=lambda p: parse_name(Path(p).name), reverse=True)

    @property
    def cache(self) -> Path:
        """This process's directory of fetched checkpoints, made at the first fetch (pipeline/scratch.py)."""
        if self._cache is None:
            self._cache = scratch_dir("restore", self.cache_root)
        return self._cache

    def fetch(self, path: str) -> Path:
        """A local copy of a checkpoint directory (downloaded whole or not at all)."""
        import pyarrow.fs as pafs

        local = self.cache / Path(path).name
        if local.exists():
            return local
        part = local.with_name(local.name + ".part")

        def download() -> None:
            shutil.rmtree(part, ignore_errors=True)
            part.mkdir(parents=True)
            pafs.copy_files(path, str(part), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())

        ride_out(f"downloading {path}", download, self.storage)
        part.rename(local)
        return local

    def upload(self, directory: Path, name: str) -> str:
        dest = f"{self.path}/{name}"
        files = sorted((p for p in directory.iterdir() if p.is_file()), key=lambda p: p.name == META_FILE)

        def put() -> None:
            self.fs.create_dir(dest)
            for f in files:  # meta.json last: it declares the checkpoint complete
                with self.fs.open_output_stream(f"{dest}/{f.name}") as out:
                    out.write(f.read_bytes())

        ride_out(f"uploading checkpoint {dest}", put, self.storage)
        return dest

    def retain(self, keep: int, just_written: str) -> list[str]:
        """Delete all but the newest ``keep`` usable checkpoints (never ``just_written``; unusable ones
        always); the deleted paths. Best-effort: an error is printed and left for the next call."""
        try:
            kept, deleted = 0, []
            for path in self.candidates():
                if path == just_written or (Path(path).name not in self.unusable and kept < keep):
                    kept += 1
                    continue
                ride_out(f"deleting old checkpoint {path}", lambda p=path: self.fs.delete_dir(p), self.storage)
                deleted.append(path)
            return deleted
        except Exception as e:  # noqa: BLE001 - retention must never fail the run
            print(f"[train] WARNING: checkpoint retention postponed ({type(e).__name__}: {e})", flush=True)
            return []

    def mark_unusable(self, path: str) -> None:
        self.unusable.add(Path(str(path)).name)

    def close(self) -> None:
        """Remove the local copies of fetched checkpoints."""
        if self._cache is not None:
            shutil.rmtree(self._cache, ignore_errors=True)
