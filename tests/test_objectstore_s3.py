"""Object stores against real backends: S3Store over HTTP (moto server) and FileStore on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.objectstore import FileStore, ObjectNotFound, S3Store, open_store
from infra.settings import Settings


@pytest.fixture
def s3_store(s3_endpoint: str, unique_id: str) -> S3Store:
    s = Settings(object_store_url=f"s3://bucket-{unique_id}/frames", s3_endpoint_url=s3_endpoint,
                 aws_access_key_id="testing", aws_secret_access_key="testing")
    store = open_store(s)
    assert isinstance(store, S3Store)
    store.ensure_bucket()
    return store


def test_s3_put_get_exists_list_delete(s3_store: S3Store) -> None:
    uri = s3_store.put("line-1/cam-1/a.jpg", b"\xff\xd8jpeg", content_type="image/jpeg")
    assert uri == f"s3://{s3_store.bucket}/frames/line-1/cam-1/a.jpg"
    other = s3_store.put("line-1/cam-2/b.jpg", b"bb")

    assert s3_store.get(uri) == b"\xff\xd8jpeg"
    assert s3_store.get("line-1/cam-2/b.jpg") == b"bb"  # a relative key resolves under the prefix
    assert s3_store.exists(uri) and not s3_store.exists("line-1/cam-1/nope.jpg")
    assert s3_store.list() == sorted([uri, other])
    assert s3_store.list("line-1/cam-2/") == [other]

    s3_store.delete(uri)
    assert not s3_store.exists(uri)
    assert s3_store.list() == [other]


def test_s3_missing_key_raises_object_not_found(s3_store: S3Store) -> None:
    with pytest.raises(ObjectNotFound):
        s3_store.get(f"s3://{s3_store.bucket}/frames/missing.jpg")
    with pytest.raises(ObjectNotFound):
        s3_store.get("s3://another-bucket/frames/x.jpg")


def test_s3_ensure_bucket_is_idempotent(s3_store: S3Store) -> None:
    s3_store.ensure_bucket()
    assert s3_store.client.head_bucket(Bucket=s3_store.bucket)["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_file_store_roundtrip(tmp_path: Path) -> None:
    store = open_store(Settings(object_store_url=(tmp_path / "objs").as_uri()))
    assert isinstance(store, FileStore)
    uri = store.put("line-1/cam-1/a.jpg", b"abc")
    assert uri == (tmp_path / "objs" / "line-1/cam-1/a.jpg").resolve().as_uri()
    assert store.get(uri) == b"abc" and store.get("line-1/cam-1/a.jpg") == b"abc"
    assert store.exists(uri)
    (tmp_path / "objs" / "line-1" / ".tmp-partial").write_bytes(b"x")  # an unfinished write
    assert store.list() == [uri]
    assert store.list("line-2") == []
    store.delete(uri)
    assert not store.exists(uri)
    with pytest.raises(ObjectNotFound):
        store.get(uri)


def test_file_store_rejects_paths_outside_its_root(tmp_path: Path) -> None:
    store = FileStore((tmp_path / "objs").as_uri())
    (tmp_path / "secret.txt").write_bytes(b"secret")
    with pytest.raises(ObjectNotFound):
        store.get("../secret.txt")
    with pytest.raises(ObjectNotFound):
        store.get((tmp_path / "secret.txt").as_uri())
    with pytest.raises(ObjectNotFound):
        store.put("../../escape.bin", b"x")
    assert not (tmp_path.parent / "escape.bin").exists()


# ---- URIs outside the store are refused, with their reason (#8 items 7, 14) --------------------------

@pytest.mark.parametrize("uri", [
    "file:///etc/passwd", "s3://{bucket}/other-prefix/x.jpg", "s3://{bucket}/framesX/x.jpg",
    "s3://{bucket}/frames/../secrets/x.jpg", "s3://{bucket}/frames/./x.jpg", "s3://another-bucket/frames/x.jpg",
    "../secrets/x.jpg", "/etc/passwd", "http://169.254.169.254/latest/meta-data", "s3://{bucket}/frames/x.jpg?v=1",
])
def test_s3_refuses_uris_outside_bucket_and_prefix(s3_store: S3Store, uri: str) -> None:
    from infra.objectstore import OutsideStore

    s3_store.client.put_object(Bucket=s3_store.bucket, Key="secrets/x.jpg", Body=b"secret")
    s3_store.client.put_object(Bucket=s3_store.bucket, Key="other-prefix/x.jpg", Body=b"secret")
    with pytest.raises(OutsideStore):
        s3_store.get(uri.format(bucket=s3_store.bucket))
    assert not s3_store.exists(uri.format(bucket=s3_store.bucket))


@pytest.mark.parametrize("uri", [
    "file:///etc/passwd", "../outside.txt", "a/../../outside.txt", "/etc/passwd", "s3://bucket/frames/x.jpg",
    "file://evil-host/{root}/a.txt", "file://{root}/../outside.txt",
])
def test_file_store_refuses_uris_outside_its_root(tmp_path: Path, uri: str) -> None:
    from infra.objectstore import OutsideStore

    store = FileStore((tmp_path / "objs").as_uri())
    store.put("a.txt", b"ok")
    (tmp_path / "outside.txt").write_text("secret")
    with pytest.raises(OutsideStore):
        store.get(uri.format(root=store.root.as_posix().lstrip("/")))


def test_fetcher_reports_outside_store_not_missing(s3_store: S3Store, tmp_path: Path) -> None:
    from inference_workers.fetch import FrameFetcher

    fs = FileStore((tmp_path / "objs").as_uri())
    for store, uri in ((s3_store, f"s3://{s3_store.bucket}/elsewhere/x.jpg"), (fs, "file:///etc/passwd"),
                       (fs, (tmp_path / "objs" / "gone.jpg").as_uri())):
        f = FrameFetcher(store, threads=1)
        try:
            [r] = f.fetch_all([{"frame_id": "00000000-0000-4000-8000-000000000000", "uri": uri, "width": 1, "height": 1, "encoding": "jpeg"}])
        finally:
            f.close()
        assert r.error is not None
        want = "missing_object" if uri.endswith("gone.jpg") else "outside_store"
        assert r.error.error_type == want, (uri, r.error)
        if want == "outside_store":
            assert str(r.error).startswith("refused: outside the store")


def test_the_worker_store_has_one_retry_layer(s3_endpoint: str, unique_id: str) -> None:
    """#8 item 6: botocore tries once inside the worker (the fetcher retries, under a batch deadline);
    other users keep botocore's standard retries."""
    from infra.objectstore import open_store
    from infra.settings import Settings

    s = Settings(object_store_url=f"s3://b-{unique_id}/frames", s3_endpoint_url=s3_endpoint)
    assert open_store(s, s3_attempts=1).client.meta.config.retries["total_max_attempts"] == 1
    assert open_store(s).client.meta.config.retries["total_max_attempts"] == 4
