"""Archives and file names, torch-free: what a submitting machine needs to describe and upload a
dataset (``pipeline.sources``), and what a worker needs to unpack one safely."""

from __future__ import annotations

import gzip
import lzma
import os
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path

from pipeline.errors import ConfigError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
MAX_ARCHIVE_MEMBERS = 1_000_000


def is_archive(path: str | Path) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


# how a cut-short or damaged tar, or its gzip/xz stream, shows up while it is read
TAR_DAMAGE = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)


def _damaged(name: str, err: BaseException) -> ConfigError:
    return ConfigError(f"archive {name} is truncated or corrupt ({err}): its data ends early or is damaged; "
                       "copy or download it again, or re-create it (`tar -tzf` reads a .tgz through to check it)")


def safe_extract(archive: Path, dest: Path, max_bytes: int, name: str | None = None) -> Path:
    """Extract a .tar/.tar.gz/.tgz/.zip into ``dest`` refusing absolute or '..' member paths,
    links, devices, expansion past ``max_bytes`` and corrupt or truncated data. ``name`` is how
    messages call the archive (the user's file name; ``archive.name`` by default). Returns the
    dataset root inside ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    name = name or archive.name

    def check_name(member: str) -> None:
        parts = Path(member).parts
        if member.startswith(("/", "\\")) or os.path.isabs(member) or ".." in parts or "\\" in member:
            raise ConfigError(
                f"archive {name} has an unsafe member path {member!r} (absolute or with '..'): "
                "rebuild the archive with relative paths inside the dataset folder")

    total = 0
    if zipfile.is_zipfile(archive):
        try:
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                if len(infos) > MAX_ARCHIVE_MEMBERS:
                    raise ConfigError(f"archive {name} has over {MAX_ARCHIVE_MEMBERS} members")
                for info in infos:
                    check_name(info.filename)
                    if stat.S_ISLNK(info.external_attr >> 16):
                        raise ConfigError(f"archive {name} holds a symlink {info.filename!r}: "
                                          "store real files instead")
                    total += info.file_size
                    if total > max_bytes:
                        raise ConfigError(f"archive {name} expands past data.max_archive_bytes="
                                          f"{max_bytes}: raise the limit or split the dataset")
                for info in infos:
                    target = dest / info.filename
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    written = 0
                    with zf.open(info) as src, open(target, "wb") as out:
                        for chunk in iter(lambda src=src: src.read(1 << 20), b""):
                            written += len(chunk)
                            if written > info.file_size:  # a lying header is a zip bomb
                                raise ConfigError(f"archive {name}: member {info.filename!r} expands past its "
                                                  "declared size: the archive is corrupt or hostile")
                            out.write(chunk)
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:
            raise ConfigError(f"archive {name} is corrupt ({err}): re-create or re-download it "
                              "(`unzip -t` checks a zip file)") from None
        return dataset_root(dest)
    try:
        tf = tarfile.open(archive)
    except tarfile.TarError:
        raise ConfigError(f"{name} is not a readable tar or zip archive ({_what_it_is(archive)}): "
                          "give a .tar, .tar.gz/.tgz or .zip of the dataset folder (for example "
                          "`tar -czf data.tgz FOLDER`), or the folder itself") from None
    except TAR_DAMAGE as err:  # the compressed stream ends, or breaks, before the first header
        raise _damaged(name, err) from None
    # a compressed tar is read as far as asked: damage past the first header shows up here
    try:
        with tf:
            members = []
            for count, m in enumerate(tf):
                if count > MAX_ARCHIVE_MEMBERS:
                    raise ConfigError(f"archive {name} has over {MAX_ARCHIVE_MEMBERS} members")
                check_name(m.name)
                if m.issym() or m.islnk():
                    raise ConfigError(f"archive {name} holds a link {m.name!r} -> "
                                      f"{m.linkname!r}: store real files instead")
                if not (m.isfile() or m.isdir()):
                    raise ConfigError(f"archive {name} holds a special file {m.name!r}")
                total += m.size
                if total > max_bytes:
                    raise ConfigError(f"archive {name} expands past data.max_archive_bytes="
                                      f"{max_bytes}: raise the limit or split the dataset")
                members.append(m)
            tf.extractall(dest, members=members, filter="data")
            # a tar cut short between members reads as a shorter tar: only its end marker (a zero
            # block where the next header would be; tf.offset is that place) tells the two apart
            tf.fileobj.seek(tf.offset)
            if len(tf.fileobj.read(tarfile.BLOCKSIZE)) < tarfile.BLOCKSIZE:
                raise _damaged(name, f"it stops after {len(members)} member(s), with no end-of-archive marker")
    except TAR_DAMAGE as err:
        raise _damaged(name, err) from None
    return dataset_root(dest)



MAGIC = ((b"\x1f\x8b", "gzip data"), (b"BZh", "bzip2 data"), (b"\xfd7zXZ\x00", "xz data"),
         (b"PK", "a damaged zip"), (b"%PDF", "a PDF"), (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"))


def _what_it_is(path: Path) -> str:
    """What a file that no archive reader accepts seems to be, from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "the file is empty"
    kind = next((what for magic, what in MAGIC if head.startswith(magic)), None)
    if kind is None:
        return "no tar header and no gzip, bzip2, xz or zip signature at its start"
    if kind == "gzip data":
        return "gzip data, but no readable tar inside: cut short, or not a tar"
    return f"it looks like {kind}"


def dataset_root(path: Path) -> Path:
    """An archive may hold the class folders directly or inside one top-level folder."""
    entries = [p for p in path.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    if len(entries) == 1 and entries[0].is_dir():
        inner = [p for p in entries[0].iterdir() if not p.name.startswith(".")]
        if inner and all(p.is_dir() for p in inner):
            return entries[0]
    return path


def printable_name(rel: str) -> str:
    """A file name safe to print and store in JSON, whatever its bytes (b'caf\\xe9.png')."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")
