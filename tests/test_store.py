"""FileStore and S3Store behave the same; S3Store maps S3 refusals to the error taxonomy.

The S3 side runs against one real SeaweedFS S3 server on loopback, started once for this
module (tests/servers.py); every S3 test is marked ``integration``.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, QpipeError, TransientError
from pipeline.store import PART_SIZE, ArtifactMissing, ArtifactRef, FileStore, S3Store, Store, open_store
from tests.servers import free_port

BUCKET = "qpipe-store-test"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from tests.servers import SeaweedS3Server

    server = SeaweedS3Server(tmp_path_factory.mktemp("s3-store"))
    server.start()
    try:
        server.make_bucket(BUCKET)
        yield server
    finally:
        server.stop()
        server.cleanup()


def s3_store(server, uri: str | None = None, **overrides: str) -> S3Store:
    args = {"endpoint": server.endpoint, "access_key": server.access_key, "secret_key": server.secret_key}
    args.update(overrides)
    return S3Store(uri or f"s3://{BUCKET}/t-{uuid.uuid4().hex[:8]}", secure=False, **args)


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """A fresh, empty store of each kind (S3: a new prefix in the shared bucket)."""
    if request.param == "file":
        return FileStore(tmp_path / "store")
    return s3_store(request.getfixturevalue("s3"))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------ the shared contract

def test_put_bytes_get_bytes(store: Store) -> None:
    ref = store.put_bytes("a/b/c.bin", b"hello")
    assert ref == ArtifactRef(store.url("a/b/c.bin"), sha(b"hello"), 5)
    assert ref.uri.startswith(store.uri.rstrip("/") + "/") and ref.uri.endswith("/a/b/c.bin")
    assert ArtifactRef.from_dict(ref.to_dict()) == ref
    assert store.get_bytes("a/b/c.bin") == b"hello"
    assert store.exists("a/b/c.bin")
    assert store.key_of(ref.uri) == "a/b/c.bin"
    ref2 = store.put_bytes("a/b/c.bin", b"")  # overwrite, and an empty object
    assert ref2.sha256 == sha(b"") and ref2.size == 0
    assert store.get_bytes("a/b/c.bin") == b""


def test_put_file_get_file(store: Store, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    ref = store.put_file("files/x.bin", src)
    assert (ref.sha256, ref.size) == (sha(data), len(data))
    dest = store.get_file("files/x.bin", tmp_path / "deep" / "er" / "out.bin")  # parents are created
    assert dest == tmp_path / "deep" / "er" / "out.bin"
    assert dest.read_bytes() == data


def test_put_json_get_json(store: Store) -> None:
    obj = {"b": [1, 2.5, None, True], "a": {"ü": "ß"}}
    ref = store.put_json("m/manifest.json", obj)
    assert store.get_json("m/manifest.json") == obj
    assert ref.sha256 == sha(store.get_bytes("m/manifest.json"))


def test_exists_list_delete(store: Store) -> None:
    keys = ["p/b.txt", "p/a.txt", "p/sub/c.txt", "p/sub/deeper/d.txt", "pq/other.txt", "x.txt"]
    for k in keys:
        store.put_bytes(k, k.encode())
    assert store.list("p") == ["p/a.txt", "p/b.txt", "p/sub/c.txt", "p/sub/deeper/d.txt"]  # sorted, recursive
    assert store.list("p/sub") == ["p/sub/c.txt", "p/sub/deeper/d.txt"]
    assert store.list("pq") == ["pq/other.txt"]  # 'p' is a folder, not a string prefix
    assert store.list("nothing") == []
    assert store.list("x.txt") == []
    assert not store.exists("p")  # a folder is not an object
    assert not store.exists("p/zzz.txt")
    store.delete("p/a.txt")
    assert not store.exists("p/a.txt")
    store.delete("p/a.txt")  # deleting a missing key is not an error
    assert store.delete_prefix("p/sub") == 2
    assert store.list("p") == ["p/b.txt"]


def test_missing_object(store: Store, tmp_path: Path) -> None:
    with pytest.raises(ArtifactMissing):
        store.get_bytes("no/such.bin")
    with pytest.raises(ArtifactMissing):
        store.get_file("no/such.bin", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()
    with pytest.raises(FileNotFoundError):  # ArtifactMissing is a FileNotFoundError
        store.get_json("no/such.json")


def test_copy(store: Store) -> None:
    ref = store.put_bytes("src/obj.bin", b"payload")
    copied = store.copy(ref, "dst/obj.bin")
    assert copied == ArtifactRef(store.url("dst/obj.bin"), ref.sha256, ref.size)
    assert store.get_bytes("dst/obj.bin") == b"payload"
    assert store.get_bytes("src/obj.bin") == b"payload"
    store.put_bytes("src/obj.bin", b"changed")  # the copy is independent of its source
    assert store.get_bytes("dst/obj.bin") == b"payload"


def test_fetch_verifies_the_digest(store: Store, tmp_path: Path) -> None:
    ref = store.put_bytes("art/model.bin", b"the model")
    out = store.fetch(ref.to_dict(), tmp_path / "ok.bin")  # a dict is accepted too
    assert out.read_bytes() == b"the model"
    wrong = ArtifactRef(ref.uri, sha(b"something else"), ref.size)
    with pytest.raises(QpipeError, match="sha256"):
        store.fetch(wrong, tmp_path / "bad.bin")
    assert not (tmp_path / "bad.bin").exists()  # a file that failed verification is not left behind
    store.put_bytes("art/model.bin", b"tampered!")  # the object changed after the ref was taken
    with pytest.raises(QpipeError, match="sha256"):
        store.fetch(ref, tmp_path / "tampered.bin")
    assert not (tmp_path / "tampered.bin").exists()


def test_put_by_digest_replaces_a_corrupt_stored_copy(store: Store, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "source.tgz"
    src.write_bytes(b"an uploaded dataset")
    ref = store.put_by_digest("sources", src, ".tgz")
    key = store.key_of(ref.uri)
    assert store.put_by_digest("sources", src, ".tgz") == ref  # present and intact: reused
    assert "uploading it again" not in caplog.text
    store.put_bytes(key, b"an uploaded datasex")  # bit rot under the same name and size
    assert store.put_by_digest("sources", src, ".tgz") == ref
    assert "uploading it again" in caplog.text  # the replace path ran
    assert store.get_bytes(key) == b"an uploaded dataset"
    store.fetch(ref, tmp_path / "again.tgz")  # verifies


def test_fetch_refuses_uri_outside_the_store(store: Store, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not inside the store"):
        store.fetch(ArtifactRef("s3://elsewhere/x.bin", sha(b""), 0), tmp_path / "x")


UNSAFE_KEYS = ["../x", "/abs", "a//b", "a/../b", "a/./b", ".", "", "a/", "a b", "a\\b", "a/b/.."]
OPERATIONS = {
    "put_bytes": lambda s, k, tmp: s.put_bytes(k, b"x"),
    "put_file": lambda s, k, tmp: s.put_file(k, tmp),
    "get_bytes": lambda s, k, tmp: s.get_bytes(k),
    "get_file": lambda s, k, tmp: s.get_file(k, tmp.parent / "out"),
    "exists": lambda s, k, tmp: s.exists(k),
    "list": lambda s, k, tmp: s.list(k),
    "delete": lambda s, k, tmp: s.delete(k),
    "url": lambda s, k, tmp: s.url(k),
    "copy": lambda s, k, tmp: s.copy(s.put_bytes("safe/src", b"x"), k),
    "key_of": lambda s, k, tmp: s.key_of(s.uri.rstrip("/") + "/" + k),
}


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_unsafe_keys_are_refused(store: Store, tmp_path: Path, key: str) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x")
    for name, op in OPERATIONS.items():
        with pytest.raises(ValueError, match="unsafe artifact key"):
            op(store, key, src)
            pytest.fail(f"{name}({key!r}) was accepted")
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()
    if isinstance(store, FileStore):
        # only the copy's legitimate source was written, nothing under an unsafe name
        assert [str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file()] == ["safe/src"]


# ------------------------------------------------------------------------------- S3 specifics

@pytest.mark.integration
def test_s3_store_with_and_without_prefix(s3) -> None:
    bare = s3_store(s3, f"s3://{BUCKET}")
    prefixed = s3_store(s3, f"s3://{BUCKET}/runs/one/")
    assert bare.uri == f"s3://{BUCKET}" and prefixed.uri == f"s3://{BUCKET}/runs/one"
    ref = prefixed.put_bytes("k.bin", b"1")
    assert ref.uri == f"s3://{BUCKET}/runs/one/k.bin"
    assert bare.get_bytes("runs/one/k.bin") == b"1"  # the prefix is a folder of the bucket
    assert "runs/one/k.bin" in bare.list("runs")
    bare.check()
    prefixed.check()
    with pytest.raises(ValueError):
        s3_store(s3, f"s3://{BUCKET}/../escape")


@pytest.mark.integration
def test_missing_bucket_is_a_config_error_naming_the_bucket(s3, tmp_path: Path) -> None:
    store = s3_store(s3, "s3://no-such-bucket-qp/prefix")
    calls = {
        "check": store.check,
        "put_bytes": lambda: store.put_bytes("a.bin", b"x"),
        "get_bytes": lambda: store.get_bytes("a.bin"),
        "get_file": lambda: store.get_file("a.bin", tmp_path / "a.bin"),
        "exists": lambda: store.exists("a.bin"),
        "list": lambda: store.list("a"),
    }
    for name, call in calls.items():
        started = time.monotonic()
        with pytest.raises(ConfigError) as info:
            call()
        assert "no-such-bucket-qp" in str(info.value), name
        assert time.monotonic() - started < 5, f"{name} was retried"


@pytest.mark.integration
@pytest.mark.parametrize("which", ["wrong-secret", "unknown-access-key"])
def test_wrong_credentials_are_a_config_error_without_the_secret(s3, which: str) -> None:
    secret = "Sup3rSecretValue" + uuid.uuid4().hex
    overrides = {"secret_key": secret}
    if which == "unknown-access-key":
        overrides["access_key"] = "QPNOSUCHKEY" + uuid.uuid4().hex[:8].upper()
    store = s3_store(s3, f"s3://{BUCKET}/creds", **overrides)
    calls = {
        "check": store.check,
        "put_bytes": lambda: store.put_bytes("a.bin", b"x"),
        "get_bytes": lambda: store.get_bytes("a.bin"),
        "exists": lambda: store.exists("a.bin"),
        "list": lambda: store.list("a"),
    }
    for name, call in calls.items():
        with pytest.raises(ConfigError) as info:
            call()
        err = info.value
        assert "credentials" in str(err), name
        for text in (str(err), repr(err), repr(err.args)):
            assert secret not in text and s3.secret_key not in text
        assert err.__cause__ is None and err.__suppress_context__  # no S3Error chained with request details


@pytest.mark.integration
def test_multipart_upload_of_40_mib(s3, tmp_path: Path) -> None:
    store = s3_store(s3)
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for i in range(40):
            f.write(i.to_bytes(4, "big") * (MiB // 4))  # every MiB differs: a misordered part shows
    size = src.stat().st_size
    assert size == 40 * MiB and size > 2 * PART_SIZE
    ref = store.put_file("big/data.bin", src)
    expected = hashlib.sha256(src.read_bytes()).hexdigest()
    assert (ref.sha256, ref.size) == (expected, size)
    stat = store.client.stat_object(store.bucket, store._obj("big/data.bin"))
    assert stat.size == size
    assert stat.etag.endswith("-3"), stat.etag  # 16 + 16 + 8 MiB: a three-part upload
    out = store.fetch(ref, tmp_path / "back.bin")
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected
    copied = store.copy(ref, "big/copy.bin")
    assert copied.sha256 == expected
    assert store.fetch(copied, tmp_path / "copy.bin").stat().st_size == size


@pytest.mark.integration
def test_unreachable_endpoint_is_transient(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there
    store = S3Store(f"s3://{BUCKET}/x", endpoint=f"127.0.0.1:{port}", access_key="ak", secret_key="sk-secret",
                    secure=False)
    started = time.monotonic()
    with pytest.raises(TransientError) as info:
        store.put_bytes("a.bin", b"x")
    elapsed = time.monotonic() - started
    assert elapsed < 30, f"gave up only after {elapsed:.1f}s"
    assert f"127.0.0.1:{port}" in str(info.value) and "sk-secret" not in str(info.value)
    assert not isinstance(info.value, ConfigError)  # a TransientError is retried, a ConfigError is not
    assert "retry" in caplog.text  # it was retried with backoff before giving up


@pytest.mark.parametrize("uri", ["s3://b/prefix", "s3://Upper/prefix", "s3://under_score", "s3://-dash/x"])
def test_invalid_bucket_name_is_a_config_error_naming_the_rule(uri: str) -> None:
    with pytest.raises(ConfigError, match="not a valid S3 bucket name"):
        open_store(uri)
