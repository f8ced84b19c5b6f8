"""pyarrow filesystems (Ray Train's checkpoint storage) from a URL and ``StorageConfig``."""

from __future__ import annotations

from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipeline.data.storage import parse_url


def filesystem(url: str, storage) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for ``url``; S3 uses the configured endpoint and keys."""
    loc = parse_url(url)
    if not loc.is_s3:
        return pafs.LocalFileSystem(), str(loc.path.resolve())
    kw = storage.boto3_kwargs()
    args = {
        "access_key": kw["aws_access_key_id"],
        "secret_key": kw["aws_secret_access_key"],
        "region": kw["region_name"],
    }
    if kw["endpoint_url"]:
        ep = urlparse(kw["endpoint_url"])
        args |= {"endpoint_override": ep.netloc, "scheme": ep.scheme or "http"}
    path = f"{loc.bucket}/{loc.key}".rstrip("/")
    return pafs.S3FileSystem(**{k: v for k, v in args.items() if v is not None}), path
