"""The shard reader (pipeline.data.reader) under real DDP: 2 gloo processes x 2 DataLoader workers on
uneven local shards with a missing one, a collective per batch, do not hang and read the planned images
(no stack). Multi-process: marked slow. The reader in one process is tested in tests/unit/data/test_reader.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from tests.unit.data.datasets import UNEVEN, write_dataset

pytestmark = pytest.mark.slow

DDP_SCRIPT = textwrap.dedent(
    """
    import json
    import torch, torch.distributed as dist
    from pipeline.config import DataConfig
    from pipeline.data import ShardReader
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    reader = ShardReader(DataConfig(url={url!r}, loader_workers=2), rank=rank, world_size=world, batch_size=128)
    steps = images = skipped = 0
    for epoch in range(2):
        for batch in reader.iterate(epoch):
            t = torch.tensor([float(len(batch))])
            dist.all_reduce(t)  # a collective per batch: hangs if one rank yields fewer batches
            steps += 1
            images += len(batch)
            skipped += batch.skipped
    dist.barrier()
    print(json.dumps({{"rank": rank, "steps": steps, "images": images, "skipped": skipped}}))
    dist.destroy_process_group()
    """
)


def test_ddp_gloo_uneven_shards_with_a_missing_one_does_not_hang(tmp_path):
    manifest, _ = write_dataset(str(tmp_path / "ds"), None, UNEVEN)
    (tmp_path / "ds" / "train" / manifest.shards[3].name).unlink()  # 120 samples gone
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(url=str(tmp_path / "ds")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=150)
            assert p.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    B = -(-1617 // 128)
    assert [r["steps"] for r in results] == [2 * B, 2 * B]
    assert sum(r["images"] for r in results) == 2 * 1617  # refilled to the plan
    assert sum(r["skipped"] for r in results) == 2 * 120
