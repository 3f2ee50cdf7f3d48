"""The artifact store: one interface, two implementations.

``file:///abs/dir`` keeps artifacts in a local folder; ``s3://bucket/prefix`` keeps them in any
S3 server through the ``minio`` client, with the endpoint and credentials taken from the
environment (``QPIPE_S3_ENDPOINT``, ``QPIPE_S3_ACCESS_KEY``, ``QPIPE_S3_SECRET_KEY``,
``QPIPE_S3_SECURE``), never from a URI, a message or a log line.

Writes are atomic per object (temporary name then rename on disk; a single PUT or a completed
multipart upload on S3), so a reader sees a whole object or none. Transient failures are retried
with exponential backoff and jitter and then raised as ``TransientError``; refusals that retrying
cannot fix (missing bucket, wrong credentials) are raised as ``ConfigError``.

Every read of an artifact by reference checks its sha256: ``fetch`` before the file is handed
to a loader, ``verify`` by streaming the object through the hash (nothing written to disk). A
mismatch is ``CorruptArtifact``, never ``TransientError``: the bytes at rest are wrong, and
waiting for the store to come back would not change them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from pipeline.errors import ConfigError, CorruptArtifact, TransientError
from pipeline.hashing import CHUNK, sha256_bytes, sha256_file
from pipeline.settings import secret, settings

log = logging.getLogger(__name__)
T = TypeVar("T")
KEY_RE = re.compile(r"^[A-Za-z0-9_.=-]+(/[A-Za-z0-9_.=-]+)*$")
PART_SIZE = 16 * 1024 * 1024


class ArtifactMissing(FileNotFoundError):
    """The object does not exist in the store."""


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object as a listing sees it: its key, size and when it was last written
    (seconds since the epoch), which is what garbage collection decides on."""

    key: str
    size: int
    modified: float


@dataclass(frozen=True)
class ArtifactRef:
    """Where an artifact lives and what it must hash to."""

    uri: str
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArtifactRef:
        return cls(uri=d["uri"], sha256=d["sha256"], size=int(d["size"]))


def check_key(key: str) -> str:
    """Refuse keys that could escape the store's prefix."""
    if not KEY_RE.match(key) or any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"unsafe artifact key {key!r}")
    return key


class Store(ABC):
    """Artifact store interface. Keys are relative, '/'-separated and checked by ``check_key``."""

    uri: str
    # on_transfer(direction, nbytes): told of every completed upload/download ("upload" or
    # "download"), e.g. to count artifact bytes in metrics; None by default
    on_transfer: Callable[[str, int], None] | None = None

    def _transferred(self, direction: str, nbytes: int) -> None:
        if self.on_transfer is not None:
            self.on_transfer(direction, nbytes)

    def url(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{check_key(key)}"

    def key_of(self, uri: str) -> str:
        prefix = self.uri.rstrip("/") + "/"
        if not uri.startswith(prefix):
            raise ConfigError(f"{uri} is not inside the store {self.uri}")
        return check_key(uri[len(prefix):])

    @abstractmethod
    def put_file(self, key: str, path: str | Path) -> ArtifactRef: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> ArtifactRef: ...

    @abstractmethod
    def get_file(self, key: str, dest: str | Path) -> Path: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def digest(self, key: str) -> tuple[str, int]:
        """The sha256 and size of the stored object, read as a stream (no local copy)."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (a folder-like prefix ending without '/'), sorted."""

    @abstractmethod
    def list_info(self, prefix: str) -> list[ObjectInfo]:
        """Like ``list``, with each object's size and modification time."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def copy(self, ref: ArtifactRef, dst: str) -> ArtifactRef:
        """Copy the artifact ``ref`` (inside this store) to ``dst``, server side where possible."""

    @abstractmethod
    def check(self) -> None:
        """Raise ConfigError or TransientError if the store cannot be used as configured."""

    def put_by_digest(self, folder: str, path: str | Path, suffix: str = "") -> ArtifactRef:
        """Upload ``path`` as ``{folder}/{sha256}{suffix}`` unless that object already exists with
        those bytes. An existing object that no longer hashes to its name (bit rot, a cut-off
        upload) is replaced, so a corrupt upload of a source cannot fail every later run that
        uses it; checking costs one streamed read of the stored object."""
        path = Path(path)
        digest = sha256_file(path)
        key = f"{folder}/{digest}{suffix}"
        try:
            stored, _ = self.digest(key)
        except ArtifactMissing:
            return self.put_file(key, path)
        if stored == digest:
            return ArtifactRef(self.url(key), digest, path.stat().st_size)
        log.warning("%s has sha256 %s, expected %s from its name: uploading it again", self.url(key), stored, digest)
        return self.put_file(key, path)

    def put_json(self, key: str, obj: Any) -> ArtifactRef:
        return self.put_bytes(key, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def fetch(self, ref: ArtifactRef | dict, dest: str | Path) -> Path:
        """Download ``ref`` to ``dest`` and verify its digest; a mismatch deletes the download and
        raises CorruptArtifact, so nothing corrupt reaches a loader."""
        if isinstance(ref, dict):
            ref = ArtifactRef.from_dict(ref)
        key = self.key_of(ref.uri)
        path = self.get_file(key, dest)
        digest = sha256_file(path)
        if digest != ref.sha256:
            size = path.stat().st_size
            path.unlink(missing_ok=True)
            raise CorruptArtifact(ref.uri, key, ref.sha256, digest, size)
        return path

    def verify(self, ref: ArtifactRef | dict) -> None:
        """Raise CorruptArtifact unless the stored object hashes to ``ref.sha256`` (ArtifactMissing
        if it is gone). Costs one streamed read of the object."""
        if isinstance(ref, dict):
            ref = ArtifactRef.from_dict(ref)
        key = self.key_of(ref.uri)
        digest, size = self.digest(key)
        if digest != ref.sha256:
            raise CorruptArtifact(ref.uri, key, ref.sha256, digest, size)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for k in keys:
            self.delete(k)
        return len(keys)


class FileStore(Store):
    """Artifacts in a local folder (the embedded default)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _atomic_write(self, key: str, write: Callable[[Any], None]) -> Path:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest

    def put_file(self, key: str, path: str | Path) -> ArtifactRef:
        def write(f: Any) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, CHUNK)

        dest = self._atomic_write(key, write)
        size = dest.stat().st_size
        self._transferred("upload", size)
        return ArtifactRef(self.url(key), sha256_file(dest), size)

    def put_bytes(self, key: str, data: bytes) -> ArtifactRef:
        self._atomic_write(key, lambda f: f.write(data))
        self._transferred("upload", len(data))
        return ArtifactRef(self.url(key), sha256_bytes(data), len(data))

    def get_file(self, key: str, dest: str | Path) -> Path:
        src = self._path(key)
        if not src.is_file():
            raise ArtifactMissing(f"no artifact at {self.url(key)}")
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        self._transferred("download", dest.stat().st_size)
        return dest

    def get_bytes(self, key: str) -> bytes:
        src = self._path(key)
        if not src.is_file():
            raise ArtifactMissing(f"no artifact at {self.url(key)}")
        data = src.read_bytes()
        self._transferred("download", len(data))
        return data

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def digest(self, key: str) -> tuple[str, int]:
        src = self._path(key)
        if not src.is_file():
            raise ArtifactMissing(f"no artifact at {self.url(key)}")
        return sha256_file(src), src.stat().st_size

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(
            str(p.relative_to(self.root))
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        )

    def list_info(self, prefix: str) -> list[ObjectInfo]:
        found = []
        for key in self.list(prefix):
            try:
                st = self._path(key).stat()
            except FileNotFoundError:  # deleted since it was listed
                continue
            found.append(ObjectInfo(key, st.st_size, st.st_mtime))
        return found

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def copy(self, ref: ArtifactRef, dst: str) -> ArtifactRef:
        return self.put_file(dst, self._path(self.key_of(ref.uri)))

    def check(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise ConfigError(f"store folder {self.root} is not writable: fix its permissions")


def _retrying(what: str, fn: Callable[[], T], attempts: int | None = None, base: float = 0.5,
              cap: float = 8.0) -> T:
    """Call ``fn``, retrying transient failures with exponential backoff and full jitter
    (``QPIPE_STORE_ATTEMPTS`` tries, 6 by default: about 15 s of patience in all); the last
    failure is raised as it is."""
    attempts = attempts or settings().store_attempts

    def told(state: RetryCallState) -> None:
        log.warning("%s failed (%s); retry %d/%d in %.1fs", what, state.outcome.exception(), state.attempt_number,
                    attempts - 1, state.next_action.sleep)

    return Retrying(stop=stop_after_attempt(attempts), wait=wait_random_exponential(multiplier=base, max=cap),
                    retry=retry_if_exception_type(TransientError), before_sleep=told, reraise=True)(fn)


class S3Store(Store):
    """Artifacts in an S3 bucket under a prefix, through the minio client."""

    CREDENTIAL_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken"}
    TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
                       "XMinioServerNotInitialized"}

    def __init__(self, uri: str, *, endpoint: str | None = None, access_key: str | None = None,
                 secret_key: str | None = None, secure: bool | None = None) -> None:
        import urllib3
        from minio import Minio

        rest = uri[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ConfigError(f"store URI {uri!r} has no bucket: use s3://BUCKET/PREFIX")
        from minio.helpers import check_bucket_name

        try:  # the client's own rule, checked here so the refusal names the URI and the fix
            check_bucket_name(bucket, strict=True)
        except ValueError:
            raise ConfigError(f"store URI {uri!r}: {bucket!r} is not a valid S3 bucket name (3-63 characters: "
                              "lowercase letters, digits, dots and hyphens, starting and ending with a letter "
                              "or digit)") from None
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        knobs = settings()
        endpoint = endpoint or knobs.s3_endpoint
        if not endpoint:
            raise ConfigError("an s3:// store needs QPIPE_S3_ENDPOINT (host:port of the S3 server) in the environment")
        endpoint = endpoint.removeprefix("http://").removeprefix("https://")
        access_key = access_key if access_key is not None else secret(knobs.s3_access_key)
        secret_key = secret_key if secret_key is not None else secret(knobs.s3_secret_key)
        if not access_key or not secret_key:
            raise ConfigError("an s3:// store needs QPIPE_S3_ACCESS_KEY and QPIPE_S3_SECRET_KEY in the environment")
        if secure is None:
            secure = knobs.s3_secure
        self.endpoint = endpoint
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=120.0),
            retries=urllib3.Retry(total=2, connect=2, read=1, backoff_factor=0.2,
                                  status_forcelist=[502, 503, 504]),
            maxsize=8,
        )
        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure,
                            http_client=http)

    def _obj(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        from minio.error import S3Error
        from urllib3.exceptions import HTTPError

        def once() -> T:
            try:
                return fn()
            except S3Error as err:
                if err.code == "NoSuchBucket":
                    raise ConfigError(
                        f"bucket {self.bucket!r} does not exist on {self.endpoint}: create it "
                        f"(for example `mc mb ALIAS/{self.bucket}`) or fix the store URI"
                    ) from None
                if err.code in self.CREDENTIAL_CODES:
                    raise ConfigError(
                        f"the S3 server {self.endpoint} refused the credentials ({err.code}): check "
                        "QPIPE_S3_ACCESS_KEY and QPIPE_S3_SECRET_KEY"
                    ) from None
                if err.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                    raise ArtifactMissing(f"no artifact at s3://{self.bucket}/{getattr(err, 'object_name', '')} "
                                          f"({what})") from None
                if err.code in self.TRANSIENT_CODES:
                    raise TransientError(f"object store {self.endpoint}: {err.code}") from None
                raise
            except (HTTPError, OSError) as err:
                if isinstance(err, FileNotFoundError):
                    raise
                raise TransientError(
                    f"object store {self.endpoint} unreachable ({type(err).__name__})"
                ) from None

        return _retrying(f"{what} on {self.endpoint}", once)

    def put_file(self, key: str, path: str | Path) -> ArtifactRef:
        path = Path(path)
        digest, size = sha256_file(path), path.stat().st_size
        self._call(f"upload {key}", lambda: self.client.fput_object(
            self.bucket, self._obj(key), str(path), part_size=PART_SIZE))
        self._transferred("upload", size)
        return ArtifactRef(self.url(key), digest, size)

    def put_bytes(self, key: str, data: bytes) -> ArtifactRef:
        self._call(f"upload {key}", lambda: self.client.put_object(
            self.bucket, self._obj(key), io.BytesIO(data), len(data)))
        self._transferred("upload", len(data))
        return ArtifactRef(self.url(key), sha256_bytes(data), len(data))

    def get_file(self, key: str, dest: str | Path) -> Path:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._call(f"download {key}", lambda: self.client.fget_object(self.bucket, self._obj(key), str(dest)))
        self._transferred("download", dest.stat().st_size)
        return dest

    def get_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            resp = self.client.get_object(self.bucket, self._obj(key))
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        data = self._call(f"download {key}", read)
        self._transferred("download", len(data))
        return data

    def exists(self, key: str) -> bool:
        try:
            self._call(f"stat {key}", lambda: self.client.stat_object(self.bucket, self._obj(key)))
            return True
        except ArtifactMissing:
            return False

    def digest(self, key: str) -> tuple[str, int]:
        def stream() -> tuple[str, int]:
            resp = self.client.get_object(self.bucket, self._obj(key))
            try:
                h, size = hashlib.sha256(), 0
                for chunk in resp.stream(CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                return h.hexdigest(), size
            finally:
                resp.close()
                resp.release_conn()

        digest, size = self._call(f"hash {key}", stream)
        self._transferred("download", size)
        return digest, size

    def list(self, prefix: str) -> list[str]:
        full = self._obj(prefix) + "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        return self._call(f"list {prefix}", lambda: sorted(
            o.object_name[strip:] for o in self.client.list_objects(self.bucket, prefix=full, recursive=True)))

    def list_info(self, prefix: str) -> list[ObjectInfo]:
        full = self._obj(prefix) + "/"
        strip = len(self.prefix) + 1 if self.prefix else 0

        def info(o: Any) -> ObjectInfo:
            return ObjectInfo(o.object_name[strip:], int(o.size or 0),
                              o.last_modified.timestamp() if o.last_modified else 0.0)

        return self._call(f"list {prefix}", lambda: sorted(
            (info(o) for o in self.client.list_objects(self.bucket, prefix=full, recursive=True)), key=lambda o: o.key))

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", lambda: self.client.remove_object(self.bucket, self._obj(key)))

    def copy(self, ref: ArtifactRef, dst: str) -> ArtifactRef:
        from minio.commonconfig import CopySource

        src = self.key_of(ref.uri)
        if ref.size > 5 * 1024**3:
            raise ConfigError(f"{ref.uri} is over 5 GiB, too large for a server-side copy")
        self._call(f"copy {src}", lambda: self.client.copy_object(
            self.bucket, self._obj(dst), CopySource(self.bucket, self._obj(src))))
        return ArtifactRef(self.url(dst), ref.sha256, ref.size)

    def check(self) -> None:
        found = self._call("bucket check", lambda: self.client.bucket_exists(self.bucket))
        if not found:
            raise ConfigError(
                f"bucket {self.bucket!r} does not exist on {self.endpoint}: create it "
                f"(for example `mc mb ALIAS/{self.bucket}`) or fix the store URI"
            )
        # bucket_exists succeeds for anonymous-readable buckets: prove the credentials too
        self._call("credentials check", lambda: list(self.client.list_objects(
            self.bucket, prefix=self._obj("qpipe-check"), recursive=False)))


def open_store(uri: str) -> Store:
    """Open a store from its URI: ``file:///dir``, a plain folder path, or ``s3://bucket/prefix``."""
    if not uri:
        raise ConfigError("no artifact store given: pass --store URI or set QPIPE_STORE_URI")
    if uri.startswith("s3://"):
        return S3Store(uri)
    if uri.startswith("file://"):
        from urllib.parse import unquote, urlparse

        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"file store URI {uri!r} names a host: use file:///absolute/path")
        return FileStore(unquote(parsed.path))
    if "://" in uri:
        raise ConfigError(f"unsupported store URI {uri!r}: use file:///path or s3://bucket/prefix")
    return FileStore(uri)

