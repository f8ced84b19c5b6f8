"""Write a training dataset as WebDataset shards + manifests, on S3 or in a local directory.

    python jobs/prepare_data.py                                   # the embedded digits -> s3://ddpm-data/digits
    python jobs/prepare_data.py --source folder --folder ~/pics --image-size 32 --channels 3 \\
        --out s3://ddpm-data/pics
    python jobs/prepare_data.py --out /tmp/digits --overwrite     # a local directory
    ray job submit --working-dir . -- python jobs/prepare_data.py --source folder \\
        --folder s3://bucket/photos --image-size 64 --channels 3 --out s3://ddpm-data/photos   # Ray Data
    python jobs/prepare_data.py --source webdataset --shards 's3://b/laion/{00000..00099}.tar' \\
        --label-key label --image-size 64 --channels 3 --out s3://ddpm-data/laion64        # re-encoded
    python jobs/prepare_data.py --help | --dry-run

Output: ``<out>/train/`` and ``<out>/eval/`` (a seeded, stratified held-out split), each with
``shard-NNNNNN.tar`` files and a ``manifest.json`` written last. An output that already holds a
dataset is refused unless --overwrite, which first deletes the old manifests, then the old shards.
Exit codes: 0 done, 1 runtime error (storage, existing dataset, unreadable input), 2 configuration.
The work is done by ``pipeline.data.prepare``.
"""

from __future__ import annotations

import os
import sys

from pipeline.cli import run_job
from pipeline.cluster import connect
from pipeline.data import prepare
from pipeline.errors import JobError


def _resolve(settings: prepare.PrepareDataSettings) -> None:
    if prepare.ingests(settings) and settings.use_ray:  # Ray Data runs on the job's cluster (RAY_ADDRESS)
        address = os.environ.get("RAY_ADDRESS")
        try:
            connect(address, log=lambda line: print(line, file=sys.stderr, flush=True))
        except Exception as e:
            raise JobError(f"cannot connect to Ray (RAY_ADDRESS={address!r}) for --engine ray: {e}") from None
    prepare.resolve(settings)


def main(argv: list[str] | None = None) -> int:
    return run_job(prepare.PrepareDataSettings, prepare.run, argv, prog="prepare_data.py", resolve=_resolve, echo=False)


if __name__ == "__main__":
    sys.exit(main())
