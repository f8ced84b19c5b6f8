"""Reading and writing objects on S3 (boto3, streaming) or in a local directory; pyarrow filesystems for
Ray Train's checkpoint storage.

URLs are ``s3://bucket/key`` or local paths (plain or ``file://``). One boto3 client per process and
storage configuration, created lazily, so DataLoader workers make their own after the fork. Clients
use path-style addressing and ``retries={"mode": "standard"}``. S3 failures are translated into the
errors of ``pipeline.data.errors`` with messages that name the endpoint, the bucket or the URL.

Every operation rides through a storage outage (connection refused or reset, timeouts, 5xx answers)
of up to ``storage.outage_s`` seconds: ``ride_out`` retries with backoff and says what it waits for,
and an S3 object being read resumes where it broke off (a ranged GET). A longer outage raises
``StorageUnreachableError``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import unquote, urlparse

from pipeline.data.errors import (
    DataError,
    MissingBucketError,
    NotFoundError,
    StorageAuthError,
    StorageUnreachableError,
)

DEFAULT_OUTAGE_S = 180.0
OUTAGE_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "500", "502", "503", "504"}
# How pyarrow's S3 filesystem (Ray Train storage, checkpoints) words an unreachable or failing endpoint.
PYARROW_OUTAGE = ("NETWORK_CONNECTION", "curlCode", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE", "SLOW_DOWN", "timed out")
T = TypeVar("T")
AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "InvalidClientTokenId"}


def storage_kwargs(storage: Any) -> dict[str, Any]:
    """boto3 client keywords from a StorageConfig, or a dict of them (passed through)."""
    if storage is None:
        return {}
    if isinstance(storage, Mapping):
        return {k: v for k, v in storage.items() if k != "outage_s"}
    return storage.boto3_kwargs()


def outage_limit(storage: Any) -> float:
    """Seconds an operation retries while the storage is unreachable (``storage.outage_s``)."""
    if isinstance(storage, Mapping):
        return float(storage.get("outage_s", DEFAULT_OUTAGE_S))
    return float(getattr(storage, "outage_s", DEFAULT_OUTAGE_S))


def is_outage(e: BaseException) -> bool:
    """Whether ``e`` says the storage is away (and may come back), not that the request is wrong."""
    if isinstance(e, StorageUnreachableError):
        return True
    if isinstance(e, DataError):
        return False
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from urllib3.exceptions import HTTPError

    if isinstance(e, BotoConnectionError | HTTPClientError | HTTPError | ConnectionError | TimeoutError):
        return True
    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return code in OUTAGE_CODES or status >= 500
    if type(e).__name__ == "ResponseStreamingError":  # botocore, a body cut off mid-read
        return True
    return isinstance(e, OSError) and any(h in str(e) for h in PYARROW_OUTAGE)


def retry_with_backoff(
    fn: Callable[[], T],
    *,
    transient: Callable[[Exception], bool],
    limit: float,
    waiting: Callable[[Exception, float], None],
    give_up: Callable[[Exception, float], Exception],
) -> T:
    """``fn()``, retried while its error is ``transient``, sleeping 0.5 s doubling to 8 s, for up to
    ``limit`` seconds from the first failure; other errors raise at once. ``waiting(error, seconds so
    far)`` is called every 10 s of waiting; ``give_up(error, seconds)`` is the exception raised then."""
    start, delay, said = None, 0.5, float("-inf")
    while True:
        try:
            return fn()
        except Exception as e:
            if not transient(e):
                raise
            now = time.monotonic()
            start = now if start is None else start
            waited = now - start
            if waited >= limit:
                raise give_up(e, waited) from e
            if now - said >= 10:
                said = now
                waiting(e, waited)
            time.sleep(min(delay, max(limit - waited, 0.05)))
            delay = min(delay * 2, 8.0)


def ride_out(what: str, fn: Callable[[], T], storage: Any = None, *, limit: float | None = None) -> T:
    """``fn()``, retried with backoff while the storage is unreachable, up to ``limit`` seconds
    (default ``storage.outage_s``); other errors raise at once. ``what`` names the operation in the
    waiting messages and in the final error."""
    limit = outage_limit(storage) if limit is None else limit

    def waiting(e: Exception, waited: float) -> None:
        print(
            f"[storage] waiting for {endpoint_name(storage)} ({what}: {type(e).__name__}); "
            f"{waited:.0f} s so far, retrying for up to {limit:g} s",
            file=sys.stderr,
            flush=True,
        )

    def give_up(e: Exception, waited: float) -> Exception:
        return StorageUnreachableError(
            f"storage at {endpoint_name(storage)} unreachable for {waited:.0f} s while {what} "
            f"(storage.outage_s={limit:g}): {type(e).__name__}: {e}"
        )

    return retry_with_backoff(fn, transient=is_outage, limit=limit, waiting=waiting, give_up=give_up)


@dataclass(frozen=True)
class Location:
    """A parsed dataset URL: an S3 object/prefix or a local path."""

    url: str
    bucket: str | None = None  # set for s3://
    key: str = ""  # S3 key (no leading slash)
    path: Path | None = None  # set for local

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None


def parse_url(url: str) -> Location:
    pr = urlparse(url)
    if pr.scheme == "s3":
        if not pr.netloc:
            raise DataError(f"{url}: an s3:// URL needs a bucket (s3://bucket/prefix)", url=url)
        return Location(url=url, bucket=pr.netloc, key=pr.path.lstrip("/"))
    if pr.scheme == "file":
        return Location(url=url, path=Path(unquote(pr.path)))
    if pr.scheme in ("", None) or (len(pr.scheme) == 1 and os.name == "nt"):
        return Location(url=url, path=Path(url))
    raise DataError(f"{url}: unsupported URL scheme {pr.scheme!r}; use s3://bucket/prefix or a local path", url=url)


def join_url(base: str, *parts: str) -> str:
    """``base`` + ``/part``..., keeping the scheme (s3://, file:// or a plain path)."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


# ------------------------------------------------------------------------------------------------
# boto3 clients: one per (process, configuration)

_CLIENTS: dict[tuple, Any] = {}
_CLIENTS_LOCK = threading.Lock()
_SESSION: Any = None  # one boto3 Session, inherited by forked workers: its parsed service models make
# a worker's client cost ~10 ms instead of ~150 ms. Sessions hold no connections; clients (which do)
# are never shared across processes.


def s3_client(storage: Any) -> Any:
    """The process's boto3 S3 client for this storage configuration (created on first use)."""
    kw = storage_kwargs(storage)
    key = (os.getpid(), tuple(sorted((k, str(v)) for k, v in kw.items())))
    client = _CLIENTS.get(key)
    if client is None:
        with _CLIENTS_LOCK:
            client = _CLIENTS.get(key)
            if client is None:
                import boto3
                from botocore.config import Config

                config = Config(
                    retries={"mode": "standard"},
                    s3={"addressing_style": "path"},
                    connect_timeout=10,
                    read_timeout=60,
                    max_pool_connections=32,  # pipeline.data.index walks 16 shards at once
                )
                global _SESSION
                if _SESSION is None:
                    _SESSION = boto3.session.Session()
                client = _SESSION.client("s3", config=config, **kw)
                _CLIENTS[key] = client
    return client


def endpoint_name(storage: Any) -> str:
    return storage_kwargs(storage).get("endpoint_url") or "AWS S3 (default endpoint)"


def translate_error(e: Exception, url: str, storage: Any, *, what: str = "") -> DataError:
    """A DataError with a clear message for a botocore exception raised while accessing url."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    endpoint = endpoint_name(storage)
    doing = f" while {what}" if what else ""
    if isinstance(e, DataError):
        return e
    if isinstance(e, EndpointConnectionError) or (is_outage(e) and not isinstance(e, ClientError)):
        return StorageUnreachableError(
            f"cannot reach the S3 endpoint {endpoint}{doing} ({url}): {e}. Is the storage running "
            f"and is storage.endpoint_url / AWS_ENDPOINT_URL right?",
            url=url,
        )
    if isinstance(e, NoCredentialsError):
        return StorageAuthError(
            f"no S3 credentials for {endpoint}{doing} ({url}): set storage.access_key_id / "
            f"storage.secret_access_key (env AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)",
            url=url,
        )
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        msg = err.get("Message", "")
        loc = parse_url(url) if url.startswith("s3://") else None
        if is_outage(e):
            return StorageUnreachableError(
                f"S3 endpoint {endpoint} failing ({code}){doing} ({url}): {msg or e}", url=url
            )
        if code in AUTH_CODES:
            return StorageAuthError(
                f"the S3 endpoint {endpoint} refused the access keys ({code}){doing} ({url}): check "
                f"storage.access_key_id / storage.secret_access_key (env AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY)",
                url=url,
            )
        if code in ("AccessDenied", "403"):
            return StorageAuthError(
                f"access denied to {url} at {endpoint}{doing} ({code}: {msg}): the keys were accepted "
                f"but lack permission for this bucket/key",
                url=url,
            )
        if code == "NoSuchBucket":
            bucket = err.get("BucketName") or (loc.bucket if loc else "?")
            return MissingBucketError(
                f"bucket {bucket!r} does not exist at {endpoint} ({url}); create it or fix the URL "
                f"(the local stack creates ddpm-data, ddpm-checkpoints and ddpm-mlflow)",
                url=url,
            )
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFoundError(f"not found: {url} (at {endpoint})", url=url)
        return DataError(f"S3 error {code or type(e).__name__}{doing} on {url} at {endpoint}: {msg or e}", url=url)
    return DataError(f"error{doing} on {url} at {endpoint}: {type(e).__name__}: {e}", url=url)


def _boto_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


# ------------------------------------------------------------------------------------------------
# Object operations


def open_read(url: str, storage: Any = None) -> IO[bytes]:
    """A binary stream of the object/file at url: for S3, boto3's streaming body (no subprocess)."""
    loc = parse_url(url)
    if not loc.is_s3:
        try:
            return open(loc.path, "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            raise NotFoundError(f"not found: {url}", url=url) from None
        except OSError as e:
            raise DataError(f"cannot open {url}: {e}", url=url) from None
    return _ResumableBody(url, storage, loc)


class _ResumableBody:
    """An S3 object's streaming body that reopens at the byte it reached (a ranged GET) when the
    connection breaks, for as long as ``ride_out`` allows."""

    def __init__(self, url: str, storage: Any, loc: Location) -> None:
        self.url, self.storage, self.loc, self.pos = url, storage, loc, 0
        self.body = self._open()

    def _open(self) -> Any:
        extra = {"Range": f"bytes={self.pos}-"} if self.pos else {}

        def get() -> Any:
            try:
                return s3_client(self.storage).get_object(Bucket=self.loc.bucket, Key=self.loc.key, **extra)["Body"]
            except _boto_errors() as e:
                raise translate_error(e, self.url, self.storage, what="opening") from None

        return ride_out(f"opening {self.url}", get, self.storage)

    def read(self, size: int = -1) -> bytes:
        while True:
            try:
                data = self.body.read() if size is None or size < 0 else self.body.read(size)
            except Exception as e:
                if not is_outage(e):
                    raise translate_error(e, self.url, self.storage, what="reading") from None
                self.close()
                self.body = self._open()
                continue
            self.pos += len(data)
            return data

    def close(self) -> None:
        self.body.close()

    def __enter__(self) -> _ResumableBody:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_bytes(url: str, storage: Any = None) -> bytes:
    with open_read(url, storage) as f:
        try:
            return f.read()
        except _boto_errors() as e:
            raise translate_error(e, url, storage, what="reading") from None


def read_range(url: str, start: int, length: int, storage: Any = None) -> bytes:
    """``length`` bytes of the object/file at ``url`` from byte ``start`` (fewer at its end): one ranged GET."""
    loc = parse_url(url)
    if not loc.is_s3:
        try:
            with open(loc.path, "rb") as f:
                f.seek(start)
                return f.read(length)
        except FileNotFoundError:
            raise NotFoundError(f"not found: {url}", url=url) from None
        except OSError as e:
            raise DataError(f"cannot read {url}: {e}", url=url) from None

    def get() -> bytes:
        try:
            rng = f"bytes={start}-{start + length - 1}"
            return s3_client(storage).get_object(Bucket=loc.bucket, Key=loc.key, Range=rng)["Body"].read()
        except _boto_errors() as e:
            code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
            if code == "InvalidRange":  # at or past the end of the object
                return b""
            raise translate_error(e, url, storage, what="reading") from None

    return ride_out(f"reading {url}", get, storage)


def list_sizes(prefix_url: str, storage: Any = None) -> dict[str, int]:
    """URL -> size in bytes of every object/file under a prefix/directory (recursively), from the listing."""
    loc = parse_url(prefix_url)
    if not loc.is_s3:
        return {u: parse_url(u).path.stat().st_size for u in list_urls(prefix_url, storage)}
    prefix = loc.key.rstrip("/") + "/" if loc.key else ""

    def listing() -> dict[str, int]:
        try:
            pages = s3_client(storage).get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix)
            return {f"s3://{loc.bucket}/{o['Key']}": int(o["Size"]) for page in pages for o in page.get("Contents", [])}
        except _boto_errors() as e:
            raise translate_error(e, prefix_url, storage, what="listing") from None

    return ride_out(f"listing {prefix_url}", listing, storage)


def object_size(url: str, storage: Any = None) -> int:
    """The size in bytes of one object/file (a HEAD request on S3)."""
    loc = parse_url(url)
    if not loc.is_s3:
        try:
            return loc.path.stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"not found: {url}", url=url) from None

    def head() -> int:
        try:
            return int(s3_client(storage).head_object(Bucket=loc.bucket, Key=loc.key)["ContentLength"])
        except _boto_errors() as e:
            raise translate_error(e, url, storage, what="reading the size of") from None

    return ride_out(f"reading the size of {url}", head, storage)


def write_bytes(url: str, data: bytes, storage: Any = None, *, content_type: str | None = None) -> None:
    """Write a whole object/file; local files appear atomically (temp file + rename)."""
    loc = parse_url(url)
    if not loc.is_s3:
        loc.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = loc.path.with_name(f".{loc.path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, loc.path)
        return
    extra = {"ContentType": content_type} if content_type else {}

    def put() -> None:
        try:
            s3_client(storage).put_object(Bucket=loc.bucket, Key=loc.key, Body=data, **extra)
        except _boto_errors() as e:
            raise translate_error(e, url, storage, what="writing") from None

    ride_out(f"writing {url}", put, storage)


def list_urls(prefix_url: str, storage: Any = None) -> Iterator[str]:
    """URLs of every object/file under a prefix/directory (recursively)."""
    loc = parse_url(prefix_url)
    if not loc.is_s3:
        if loc.path.is_dir():
            base = prefix_url.rstrip("/")
            for p in sorted(loc.path.rglob("*")):
                if p.is_file():
                    yield f"{base}/{p.relative_to(loc.path).as_posix()}"
        return
    prefix = loc.key.rstrip("/") + "/" if loc.key else ""

    def listing() -> list[str]:
        try:
            paginator = s3_client(storage).get_paginator("list_objects_v2")
            pages = paginator.paginate(Bucket=loc.bucket, Prefix=prefix)
            return [f"s3://{loc.bucket}/{obj['Key']}" for page in pages for obj in page.get("Contents", [])]
        except _boto_errors() as e:
            raise translate_error(e, prefix_url, storage, what="listing") from None

    yield from ride_out(f"listing {prefix_url}", listing, storage)


def delete_urls(urls: list[str], storage: Any = None) -> None:
    """Delete objects/files (missing ones are fine)."""
    by_bucket: dict[str, list[str]] = {}
    for url in urls:
        loc = parse_url(url)
        if loc.is_s3:
            by_bucket.setdefault(loc.bucket, []).append(loc.key)
        else:
            loc.path.unlink(missing_ok=True)
    for bucket, keys in by_bucket.items():
        for i in range(0, len(keys), 1000):
            chunk = keys[i : i + 1000]

            def delete(bucket: str = bucket, chunk: list[str] = chunk) -> dict:
                try:
                    return s3_client(storage).delete_objects(
                        Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True}
                    )
                except _boto_errors() as e:
                    raise translate_error(e, f"s3://{bucket}/{chunk[0]}", storage, what="deleting") from None

            out = ride_out(f"deleting in s3://{bucket}", delete, storage)
            if out.get("Errors"):
                first = out["Errors"][0]
                raise DataError(
                    f"could not delete {len(out['Errors'])} object(s) in s3://{bucket}, e.g. "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )


def check_bucket(url: str, storage: Any = None) -> None:
    """Fail early with a clear message if an s3:// URL's bucket is missing or the keys are refused."""
    loc = parse_url(url)
    if not loc.is_s3:
        return

    def check() -> None:
        try:
            s3_client(storage).list_objects_v2(Bucket=loc.bucket, Prefix=loc.key, MaxKeys=1)
        except _boto_errors() as e:
            raise translate_error(e, url, storage, what="checking the bucket") from None

    ride_out(f"checking {url}", check, storage)


def register_webdataset_s3(storage: Any) -> None:
    """Let plain ``webdataset`` open ``s3://`` URLs through boto3 streaming (no ``pipe:``/shell).

    Sets ``webdataset.gopen.gopen_schemes["s3"]`` for this process; the client is still created
    lazily per process, so it is safe to call before DataLoader workers fork.
    """
    from webdataset.gopen import gopen_schemes

    kw = storage_kwargs(storage) | {"outage_s": outage_limit(storage)}

    def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> IO[bytes]:
        if mode[0] != "r":
            raise ValueError(f"{url}: only reading is supported by this s3 handler")
        return open_read(url, kw)

    gopen_schemes["s3"] = gopen_s3


def filesystem(url: str, storage, *, keys: bool = True) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for ``url``: Ray Train's checkpoint storage. S3 uses the
    configured endpoint and keys; ``keys=False``: the AWS credential chain of each process that uses
    it (the environment), for a filesystem that is written to storage pickled (Ray Tune's state)."""
    import pyarrow.fs as pafs

    loc = parse_url(url)
    if not loc.is_s3:
        return pafs.LocalFileSystem(), str(loc.path.resolve())
    kw = storage.boto3_kwargs()
    args = {"region": kw["region_name"]}
    if keys:
        args |= {"access_key": kw["aws_access_key_id"], "secret_key": kw["aws_secret_access_key"]}
    if kw["endpoint_url"]:
        ep = urlparse(kw["endpoint_url"])
        args |= {"endpoint_override": ep.netloc, "scheme": ep.scheme or "http"}
    path = f"{loc.bucket}/{loc.key}".rstrip("/")
    return pafs.S3FileSystem(**{k: v for k, v in args.items() if v is not None}), path
