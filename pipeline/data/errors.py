"""Errors of the data layer, each with a message meant for the user.

``DataError`` is the base of everything raised for storage and dataset problems. Every class takes a
single message argument (plus optional keywords), so a DataLoader worker can re-raise it in the main
process unchanged.
"""

from __future__ import annotations

from pipeline.config import ConfigError
from pipeline.errors import JobError


class DataError(JobError):
    """A storage or dataset problem."""

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class StorageAuthError(DataError):
    """The S3 endpoint refused the access keys (InvalidAccessKeyId, SignatureDoesNotMatch, AccessDenied)."""


class MissingBucketError(DataError):
    """The bucket named in an s3:// URL does not exist at the endpoint."""


class StorageUnreachableError(DataError):
    """The S3 endpoint could not be reached at all."""


class NotFoundError(DataError):
    """An object or local file does not exist."""


class ManifestError(DataError):
    """A dataset's manifest is missing, unreadable or not of a known format."""


class ShardError(DataError):
    """A bad shard or sample, raised only in strict mode (otherwise skipped and counted)."""


class DatasetExistsError(DataError):
    """The output prefix of prepare_data already holds a dataset (use --overwrite)."""


class DatasetMismatchError(ConfigError):
    """The manifest does not match the configuration (image size, channels)."""
