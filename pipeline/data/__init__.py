"""Training data: WebDataset shards + manifest on S3 or a local directory.

Importable without Ray and MLflow. The trainer needs ``ShardReader`` and ``Batch``; the evaluation
job ``load_split_arrays``; ``jobs/prepare_data.py`` writes datasets with ``SplitWriter``.
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
from pipeline.data.reader import Batch, EpochPlan, ShardReader, SplitArrays, StreamPlan, load_split_arrays, plan_epoch
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
