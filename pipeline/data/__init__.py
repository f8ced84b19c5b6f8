"""Training data: WebDataset shards + manifest on S3 or a local directory.

Importable without Ray and MLflow. The flow: ``prepare`` (sources -> ``writer``) writes a dataset;
``manifest`` describes it; ``plan`` splits each epoch's shards over ranks and streams; ``shards``
reads and decodes samples and accounts for bad data; ``reader`` turns them into training batches
(``ShardReader``, ``Batch``). The evaluation reads whole splits with ``load_split_arrays``.
See docs/data.md.
"""

from pipeline.data.errors import (
    DataError,
    DatasetExistsError,
    DatasetMismatchError,
    ManifestError,
    MissingBucketError,
    NotFoundError,
    ShardError,
    StorageAuthError,
    StorageUnreachableError,
)
from pipeline.data.manifest import Manifest, ShardEntry, check_matches, open_manifest
from pipeline.data.plan import EpochPlan, StreamPlan, plan_epoch
from pipeline.data.reader import Batch, ShardReader
from pipeline.data.shards import SplitArrays, load_split_arrays
from pipeline.data.storage import register_webdataset_s3

__all__ = [
    "Batch",
    "DataError",
    "DatasetExistsError",
    "DatasetMismatchError",
    "EpochPlan",
    "Manifest",
    "ManifestError",
    "MissingBucketError",
    "NotFoundError",
    "ShardEntry",
    "ShardError",
    "ShardReader",
    "SplitArrays",
    "StorageAuthError",
    "StorageUnreachableError",
    "StreamPlan",
    "check_matches",
    "load_split_arrays",
    "open_manifest",
    "plan_epoch",
    "register_webdataset_s3",
]
