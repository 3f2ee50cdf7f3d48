"""Dataset sources: turning what the user named into something every worker can read.

Workers may run on other machines than the submitter, so a local folder or archive is uploaded
to the store at submit time (``prepare_source``) and its digest enters the ingest stage's key;
workers then read it from the store (``materialize_source``). A folder travels as a
deterministic tar (sorted names, zeroed times and owners), so the same files give the same digest.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.archives import ARCHIVE_SUFFIXES, dataset_root, is_archive, printable_name, safe_extract
from pipeline.errors import ConfigError
from pipeline.hashing import canonical_json, sha256_bytes
from pipeline.store import S3Store, Store

if TYPE_CHECKING:
    from pipeline.spec import PipelineSpec

SKIPPED_MEMBER = ".qpipe-skipped.json"


def _local_path(value: str) -> Path:
    if value.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(value).path))
    return Path(value).expanduser()


def _suffix(name: str) -> str:
    low = name.lower()
    return next(s for s in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True) if low.endswith(s))


def folder_to_tar(root: Path, dest: Path) -> Path:
    """A reproducible tar of an ImageFolder. Symlinks to files inside ``root`` are stored as the
    files they point to; symlinks leading outside are left out and listed in a member named
    ``.qpipe-skipped.json`` so that ingest reports them."""
    real_root = root.resolve()
    skipped: list[dict[str, str]] = []

    def add(tf: tarfile.TarFile, path: Path, arcname: str) -> None:
        info = tarfile.TarInfo(arcname)
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        if path.is_dir():
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(info)
            return
        info.size, info.mode = path.stat().st_size, 0o644
        with open(path, "rb") as f:
            tf.addfile(info, f)

    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            base = Path(dirpath)
            for name in sorted(dirnames) + sorted(filenames):
                p = base / name
                rel = os.path.relpath(p, root)
                reason = None
                if p.is_symlink():
                    target = p.resolve()
                    if not target.is_relative_to(real_root) or not target.exists():
                        reason = "symlink points outside the dataset"
                    elif target.is_dir():
                        reason = "symlinked folder is not followed"
                elif not (p.is_file() or p.is_dir()):
                    reason = "not a regular file"
                if reason:
                    skipped.append({"file": printable_name(rel), "reason": reason})
                    continue
                add(tf, p, rel)
        data = canonical_json(skipped).encode()
        info = tarfile.TarInfo(SKIPPED_MEMBER)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        tf.addfile(info, io.BytesIO(data))
    return dest


def _s3_source_store(uri: str) -> tuple[S3Store, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return S3Store(f"s3://{bucket}"), key.strip("/")


# The user's object keys are read through the client as they are: S3 allows any UTF-8 name
# (spaces, accents, CJK), while the store's own methods take only qpipe's plain artifact keys
# (pipeline.store.check_key). What each key may do is checked where it matters: the local path
# it becomes (``_key_problem``).

def _s3_objects(src: S3Store, prefix: str) -> list[tuple[str, str]]:
    """(key, etag) of every object under ``prefix``/, sorted."""
    return src._call(f"list {prefix}/", lambda: sorted(
        (o.object_name, o.etag) for o in src.client.list_objects(src.bucket, prefix=prefix + "/", recursive=True)))


def _s3_download(src: S3Store, key: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    src._call(f"download {key}", lambda: src.client.fget_object(src.bucket, key, str(dest)))
    return dest


def _key_problem(rel: str) -> str | None:
    """Why an object key (relative to the source prefix) cannot become a path in the local copy
    of the dataset, or None. Keys are not paths: an S3 server may hold 'a/../../x' or 'a//b',
    which must not write outside the copy."""
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "object key has an empty, '.' or '..' part: not read (it could land outside the dataset)"
    if any(len(p.encode("utf-8")) > 255 for p in parts):
        return "object key has a part longer than 255 bytes, which no local file name can hold"
    return None


def prepare_source(value: str | None, store: Store) -> dict[str, Any] | None:
    """Describe (and, for local data, upload) a dataset source. Runs on the submitting machine."""
    if value is None:
        return None
    if value.startswith("builtin:"):
        import sklearn

        return {"kind": "builtin", "name": value.split(":", 1)[1],
                "sha256": sha256_bytes(f"{value}:scikit-learn-{sklearn.__version__}".encode())}
    if value.startswith("s3://"):
        src, key = _s3_source_store(value)
        if not key:
            raise ConfigError(f"data source {value} names a whole bucket: give the folder of the dataset in it, "
                              "s3://BUCKET/PREFIX/ (or an archive, s3://BUCKET/KEY.tgz)")
        if is_archive(key):
            st = src._call("stat", lambda: src.client.stat_object(src.bucket, key))
            digest = sha256_bytes(canonical_json([value, st.etag, st.size]).encode())
            return {"kind": "s3-archive", "uri": value, "sha256": digest}
        listing = [[k, etag] for k, etag in _s3_objects(src, key)]
        if not listing:
            raise ConfigError(f"data source {value} holds no objects: check the bucket and prefix")
        return {"kind": "s3-folder", "uri": value, "sha256": sha256_bytes(canonical_json(listing).encode())}
    path = _local_path(value)
    if not path.exists():
        raise ConfigError(f"data source {value} does not exist: give an existing folder or archive "
                          "(relative paths resolve against the spec file's folder)")
    with tempfile.TemporaryDirectory() as tmp:
        if path.is_dir():
            archive, suffix = folder_to_tar(path, Path(tmp) / "data.tar"), ".tar"
        elif is_archive(path.name):
            archive, suffix = path, _suffix(path.name)
        else:
            raise ConfigError(f"data source {value} is neither a folder nor a {'/'.join(ARCHIVE_SUFFIXES)} archive")
        ref = store.put_by_digest("sources", archive, suffix)
    return {"kind": "archive", "uri": ref.uri, "sha256": ref.sha256, "name": path.name}


def materialize_source(desc: dict[str, Any], store: Store, workdir: Path, max_bytes: int) -> tuple[Path, list[dict]]:
    """Make a described source readable as a local ImageFolder; returns its root and the files
    left out before upload. Runs on a worker."""
    kind = desc["kind"]
    workdir.mkdir(parents=True, exist_ok=True)
    if kind == "archive":
        suffix = _suffix(desc["uri"])
        local = store.fetch({"uri": desc["uri"], "sha256": desc["sha256"], "size": 0}, workdir / f"src{suffix}")
        name = desc.get("name") or local.name
    elif kind == "s3-archive":
        src, key = _s3_source_store(desc["uri"])
        local = _s3_download(src, key, workdir / f"src{_suffix(key)}")
        name = desc["uri"]
    elif kind == "s3-folder":
        src, key = _s3_source_store(desc["uri"])
        root = workdir / "folder"
        root.mkdir(parents=True, exist_ok=True)
        left_out, wanted = [], []
        for k, _ in _s3_objects(src, key):
            rel = k[len(key) + 1:]
            if not rel or rel.endswith("/"):  # a folder marker, as S3 consoles make: the folder comes with its files
                continue
            reason = _key_problem(rel)
            if reason:
                left_out.append({"file": rel, "reason": reason})
            else:
                wanted.append((k, rel))
        folders = {rel.rsplit("/", 1)[0] for _, rel in wanted if "/" in rel}
        folders |= {f.rsplit("/", i)[0] for f in list(folders) for i in range(1, f.count("/") + 1)}
        for k, rel in wanted:
            if rel in folders:  # S3 may hold both 'a/b' and 'a/b/c'; a disk cannot
                left_out.append({"file": rel, "reason": "object key is also the folder of other keys: not read"})
                continue
            _s3_download(src, k, root / rel)
        return dataset_root(root), left_out
    else:
        raise ConfigError(f"unknown source kind {kind!r}")
    root = safe_extract(local, workdir / "extracted", max_bytes, name)
    local.unlink()
    skipped: list[dict] = []
    marker = workdir / "extracted" / SKIPPED_MEMBER
    if marker.exists():  # a tar qpipe made from a folder: its root is the dataset's root
        skipped = json.loads(marker.read_text())
        marker.unlink()
        root = workdir / "extracted"
    return root, skipped


# ------------------------------------------------------------------ at submission
def prepare_sources(spec: PipelineSpec, store: Store) -> dict[str, Any]:
    """Describe and upload the spec's data sources and checkpoint (see pipeline.sources)."""
    sources = {"source": prepare_source(spec.data.source, store),
               "val_source": prepare_source(spec.data.val_source, store)}
    w = spec.model.weights
    if w is None:
        sources["weights"] = None
    elif "/" in w or w.startswith(("file://", "s3://")):
        desc = prepare_source(w, store) if not w.endswith((".pt", ".pth")) else _upload_checkpoint(w, store)
        sources["weights"] = desc
    else:
        sources["weights"] = {"kind": "torchvision", "name": w,
                              "sha256": sha256_bytes(f"torchvision:{spec.model.arch}:{w}".encode())}
    return sources


def _upload_checkpoint(value: str, store: Store) -> dict[str, Any]:
    if value.startswith("s3://"):
        raise ConfigError("checkpoints in s3:// are read through the store: put the file under the store "
                          "URI and give its path, or give a local file")
    path = Path(value.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise ConfigError(f"checkpoint {value} does not exist: give a local .pt/.pth state_dict file")
    ref = store.put_by_digest("weights", path, path.suffix)
    return {"kind": "checkpoint", "name": path.name, **ref.to_dict()}
