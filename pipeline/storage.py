"""Object storage handles built from ``StorageConfig``: pyarrow (Ray Train's storage) and URL parsing."""

from __future__ import annotations

from urllib.parse import urlparse

import pyarrow.fs as pafs


def split_url(url: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('s3', 'bucket/a/b'); a local path -> ('file', '/abs/path')."""
    p = urlparse(url)
    if p.scheme == "s3":
        return "s3", f"{p.netloc}/{p.path.lstrip('/')}".rstrip("/")
    if p.scheme in ("", "file"):
        from pathlib import Path

        return "file", str(Path(p.path if p.scheme else url).resolve())
    raise ValueError(f"unsupported storage URL {url!r}: use s3://bucket/prefix or a local path")


def filesystem(url: str, storage) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for ``url``; S3 uses the configured endpoint and keys."""
    scheme, path = split_url(url)
    if scheme == "file":
        return pafs.LocalFileSystem(), path
    kw = storage.boto3_kwargs()
    args = {
        "access_key": kw["aws_access_key_id"],
        "secret_key": kw["aws_secret_access_key"],
        "region": kw["region_name"],
    }
    if kw["endpoint_url"]:
        ep = urlparse(kw["endpoint_url"])
        args |= {"endpoint_override": ep.netloc, "scheme": ep.scheme or "http"}
    return pafs.S3FileSystem(**{k: v for k, v in args.items() if v is not None}), path
