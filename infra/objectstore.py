"""One object-store interface, two backends: a local directory (file://) and S3 (s3://, boto3).

Keys are relative paths such as ``frames/line-1/cam-1/2026/11/26/<frame_id>.jpg``; ``put`` returns
the object's full URI, which is what FrameRefs carry.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

from infra.errors import InfraError
from infra.settings import Settings


class ObjectStoreError(InfraError):
    """The store could not be reached or refused the request (retryable)."""


class ObjectNotFound(InfraError, KeyError):
    """No object under that URI (not retryable: the reference is bad)."""


class OutsideStore(ObjectNotFound):
    """The URI points outside the configured store (another scheme, bucket, prefix or root, or ``..``):
    refused without touching the backend."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "outside the store"


def _has_dot_segments(path: str) -> bool:
    return any(part in ("..", ".") for part in path.split("/"))


class ObjectStore(Protocol):
    url: str

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str: ...
    def get(self, uri: str) -> bytes: ...
    def exists(self, uri: str) -> bool: ...
    def delete(self, uri: str) -> None: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def entries(self, prefix: str = "") -> list[tuple[str, float]]: ...


class FileStore:
    def __init__(self, url: str) -> None:
        self.root = Path(unquote(urlparse(url).path)).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()

    def _path(self, uri: str) -> Path:
        if uri.startswith("file://"):
            u = urlparse(uri)
            if u.netloc not in ("", "localhost"):
                raise OutsideStore(f"{uri} names host {u.netloc!r}; the store is {self.url}")
            p = Path(unquote(u.path)).resolve()
        elif "://" in uri or uri.startswith("/"):
            raise OutsideStore(f"{uri} is not in the store {self.url}")
        else:
            p = (self.root / uri).resolve()
        if not p.is_relative_to(self.root):
            raise OutsideStore(f"{uri} is outside the store {self.url}")
        return p

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        p = self._path(key)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-")
            os.fchmod(fd, 0o644)  # mkstemp makes it 0600: workers running as another user must read it
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, p)  # atomic: readers never see half a frame
        except OSError as exc:
            raise ObjectStoreError(f"cannot write {p}: {exc}") from exc
        return p.as_uri()

    def get(self, uri: str) -> bytes:
        p = self._path(uri)
        try:
            return p.read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(uri) from None
        except OSError as exc:
            raise ObjectStoreError(f"cannot read {uri}: {exc}") from exc

    def exists(self, uri: str) -> bool:
        return self._path(uri).is_file()

    def delete(self, uri: str) -> None:
        self._path(uri).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix
        if not base.exists():
            return []
        return sorted(p.as_uri() for p in base.rglob("*") if p.is_file() and not p.name.startswith(".tmp-"))

    def entries(self, prefix: str = "") -> list[tuple[str, float]]:
        """(URI, modification time in epoch seconds) of every object under ``prefix``."""
        base = self.root / prefix
        if not base.exists():
            return []
        out = []
        for p in base.rglob("*"):
            if p.name.startswith(".tmp-"):
                continue
            try:
                st = p.stat()
            except OSError:
                continue
            if p.is_file():
                out.append((p.as_uri(), st.st_mtime))
        return sorted(out)


class S3Store:
    """``total_attempts``: botocore's own tries per call, the first included. The inference worker
    passes 1 (no botocore retry): its fetcher is the one retry layer, bounded by a per-batch deadline
    (stacked retries could outlast max.poll.interval.ms)."""

    def __init__(self, url: str, settings: Settings, *, total_attempts: int = 4) -> None:
        import boto3
        from botocore.config import Config

        u = urlparse(url)
        self.bucket = u.netloc
        self.prefix = u.path.lstrip("/")
        if self.prefix and not self.prefix.endswith("/"):
            self.prefix += "/"
        self.url = f"s3://{self.bucket}/{self.prefix}"
        secret = settings.aws_secret_access_key.get_secret_value() if settings.aws_secret_access_key else None
        self.client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=settings.aws_access_key_id,
            aws_secret_access_key=secret,
            config=Config(retries={"total_max_attempts": total_attempts, "mode": "standard"}, connect_timeout=3, read_timeout=10,
                          max_pool_connections=32),
        )

    def _key(self, uri: str) -> str:
        """The object key of a URI or relative key, refused (OutsideStore) unless under bucket/prefix."""
        if uri.startswith("s3://"):
            u = urlparse(uri)
            if u.netloc != self.bucket:
                raise OutsideStore(f"{uri} is not in bucket {self.bucket} (store {self.url})")
            key = u.path[1:] if u.path.startswith("/") else u.path
            if u.query or u.fragment or u.params:
                raise OutsideStore(f"{uri}: query strings and fragments are not object keys")
        elif "://" in uri or uri.startswith("/"):
            raise OutsideStore(f"{uri} is not in the store {self.url}")
        else:
            key = self.prefix + uri
        if not key.startswith(self.prefix) or _has_dot_segments(key) or "//" in key or not key:
            raise OutsideStore(f"{uri} is outside the store prefix {self.url}")
        return key

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        k = self._key(key)
        try:
            self.client.put_object(Bucket=self.bucket, Key=k, Body=data, ContentType=content_type)
        except (BotoCoreError, ClientError) as exc:
            raise ObjectStoreError(f"cannot write s3://{self.bucket}/{k}: {exc}") from exc
        return f"s3://{self.bucket}/{k}"

    def get(self, uri: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        k = self._key(uri)
        try:
            return self.client.get_object(Bucket=self.bucket, Key=k)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFound(uri) from None
            raise ObjectStoreError(f"cannot read {uri}: {exc}") from exc
        except BotoCoreError as exc:
            raise ObjectStoreError(f"cannot read {uri}: {exc}") from exc

    def exists(self, uri: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(uri))
            return True
        except Exception:
            return False

    def delete(self, uri: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(uri))

    def list(self, prefix: str = "") -> list[str]:
        out: list[str] = []
        pag = self.client.get_paginator("list_objects_v2")
        for page in pag.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            out += [f"s3://{self.bucket}/{o['Key']}" for o in page.get("Contents", [])]
        return sorted(out)

    def entries(self, prefix: str = "") -> list[tuple[str, float]]:
        """(URI, LastModified in epoch seconds) of every object under ``prefix``."""
        out: list[tuple[str, float]] = []
        pag = self.client.get_paginator("list_objects_v2")
        for page in pag.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            out += [(f"s3://{self.bucket}/{o['Key']}", o["LastModified"].timestamp()) for o in page.get("Contents", [])]
        return sorted(out)

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception:
            self.client.create_bucket(Bucket=self.bucket)


def open_store(settings: Settings, url: str | None = None, *, s3_attempts: int = 4) -> FileStore | S3Store:
    url = url or settings.store_url()
    if url.startswith("file://"):
        return FileStore(url)
    if url.startswith("s3://"):
        return S3Store(url, settings, total_attempts=s3_attempts)
    raise ValueError(f"unsupported object store URL {url!r} (use file:// or s3://)")
