"""Bad input, end to end: one table of everything a user may get wrong, each row naming the
input and what qpipe must do with it.

Outcomes:
- ``refused``: SpecError/ConfigError before anything is enqueued or written; the message names
  the problem and the fix (checked by substring).
- ``skipped``: ingest leaves the file out and lists it, with its reason, in ``data.skipped``;
  the run still succeeds.
- ``converted``: the image is decoded to RGB and ingested (counted in its class), not refused.
- ``clamped``: a setting the data cannot meet is lowered to what the data allows; the run
  succeeds and ``data.notes`` says what was asked, what was used and how to change it.
- ``failed-stage``: the run ends FAILED with one failed stage naming the cause; stages that
  do not depend on it are unaffected, downstream ones are not run, and no partial output is
  left (every ``stages/{stage}/{key}/`` folder in the store holds a ``manifest.json``).

Every ``skipped``/``converted``/``clamped`` row is one file (or folder, or setting) of a single
dataset that is run through the whole pipeline once (``main_run``), so the table costs one run;
the rows about S3 object keys share a second dataset, an S3 prefix, of which only the ingest stage
runs, since nothing after it reads the source (``s3_run``); every other row runs on its own, and
``refused`` rows never get past the spec or the submission.

Decisions: a state_dict whose head size differs from the dataset's class count is a backbone and
gets a new head (not an error), so the mismatched-checkpoint rows use checkpoints of a *different
arch*, which must fail naming the arch. A data.calib_size over the training split is clamped, not
refused: the default (256) must work on small datasets. A corrupt or truncated archive fails the
ingest stage (only a worker reads it), naming the file, what is wrong and how to get a good copy.
"""

from __future__ import annotations

import io
import os
import struct
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import ConfigError, SpecError
from pipeline.plan import build_plan
from pipeline.runner import run_in_process
from pipeline.sources import prepare_sources
from pipeline.spec import load_spec
from pipeline.stages import execute
from pipeline.store import FileStore
from tests.helpers import encoded, make_folder, noise, tar_of, zip_of
from tests.servers import RedisServer, free_port
from workers.client import Client

SIZE = 16
PIXEL_LIMIT = 1_000_000  # data.max_image_pixels of the shared datasets' spec
CALIB_ASKED = 1000  # data.calib_size of the shared datasets' spec: more than their training images
GOOD_PER_CLASS = 6  # decodable images in each of the two main classes
S3_PREFIX = "bad input 数据"  # the S3 dataset's prefix: a space and CJK, like its keys


def tiny_spec(source: str, name: str = "bad-input", **data: Any) -> dict:
    return {
        "name": name, "seed": 0,
        "data": {"source": source, "image_size": SIZE, "calib_size": 8, **data},
        "model": {"arch": "resnet18"},
        "finetune": {"epochs": 1, "batch_size": 16, "lr": 0.01},
        "quantize": {"variants": [{"name": "ptq-minmax", "method": "static", "observer": "minmax"}]},
        "benchmark": {"batch_sizes": [1], "iterations": 1, "warmup": 0, "accuracy_budget": 1.0,
                      "runtimes": ["torchscript"]},
    }


# ------------------------------------------------------------------------------ file makers

def write_bytes(data: bytes | Callable[[], bytes]) -> Callable[[bytes, Path], None]:
    def write(path: bytes, root: Path) -> None:
        with open(path, "wb") as f:
            f.write(data() if callable(data) else data)
    return write


def write_image(make: Callable[[], Image.Image], fmt: str, **kw: Any) -> Callable[[bytes, Path], None]:
    return write_bytes(lambda: encoded(make(), fmt, **kw))


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 1-bit greyscale PNG whose header claims width x height pixels: a few dozen bytes on
    disk, 10 gigapixels if decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + \
        chunk(b"IEND", b"")


def truncated(fmt: str) -> bytes:
    data = encoded(noise(64, 64, seed=11), fmt)
    return data[: len(data) // 2]


def gradient16() -> Image.Image:
    img = Image.fromarray(np.tile(np.linspace(0, 65535, 24).astype(np.uint16), (24, 1)))
    assert img.mode.startswith("I;16") or img.mode == "I"
    return img


def palette_with_transparency() -> Image.Image:
    img = Image.new("P", (20, 20), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (0, 0, 10, 20))
    img.info["transparency"] = 0
    return img


def symlink_to(target: Callable[[Path], Path]) -> Callable[[bytes, Path], None]:
    """A symlink maker; ``target`` maps the dataset root to what the link points at."""
    def write(path: bytes, root: Path) -> None:
        os.symlink(os.fsencode(target(root)), path)
    return write


def make_fifo(path: bytes, root: Path) -> None:
    os.mkfifo(path)


PNG = encoded(noise(seed=5), "PNG")
TWO_CLASSES = [(f"{c}/{i}.png", "file", encoded(noise(seed=i * 7 + len(c)), "PNG"))
               for c in ("a", "b") for i in range(4)]


# ------------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Case:
    id: str
    input: str  # the bad input, in words
    outcome: str  # refused | skipped | converted | clamped | failed-stage
    expect: str | tuple[str, ...] = ""  # substring(s) of the reason / error message / note (problem and fix)
    # skipped / converted: a path (bytes) in a shared dataset (main: a folder; s3: keys under an
    # S3 prefix) and what writes it there
    file: bytes = b""
    dataset: str = "main"
    write: Callable[[bytes, Path], None] | None = None
    shown: str | None = None  # how data.skipped prints ``file`` (default: file as text)
    pixels: Callable[[np.ndarray], bool] | None = None  # check of the decoded 16x16 RGB image
    # refused / failed-stage: what to run (gets a Ctx), and which stage must fail
    act: Callable[[Ctx], Any] | None = None
    stage: str = ""
    error: type[BaseException] = ConfigError
    marks: tuple = field(default=())

    @property
    def expected(self) -> tuple[str, ...]:
        return (self.expect,) if isinstance(self.expect, str) else self.expect

    def param(self) -> Any:
        return pytest.param(self, id=self.id, marks=self.marks)


@dataclass
class Ctx:
    tmp: Path
    request: pytest.FixtureRequest
    monkeypatch: pytest.MonkeyPatch
    store: FileStore
    checks: list[Callable[[], None]] = field(default_factory=list)  # extra post-conditions

    def run(self, spec: dict | str | Path) -> dict:
        return run_in_process(spec, self.store)


def xfail(reason: str, raises: type[BaseException] | tuple = AssertionError) -> tuple:
    return (pytest.mark.xfail(strict=True, reason=reason, raises=raises),)


INTEGRATION = (pytest.mark.integration,)


# ---- actions of the refused / failed-stage rows

def spec_with(**edits: Any) -> Callable[[Ctx], Any]:
    """Run a builtin-digits spec with ``edits`` ('section.key' -> value)."""
    def act(ctx: Ctx) -> Any:
        spec = tiny_spec("builtin:digits")
        for path, value in edits.items():
            *parents, leaf = path.split(".")
            node = spec
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return ctx.run(spec)
    return act


def dataset_run(build: Callable[[Path], Path], **data: Any) -> Callable[[Ctx], Any]:
    def act(ctx: Ctx) -> Any:
        return ctx.run(tiny_spec(str(build(ctx.tmp)), **data))
    return act


def abs_member_tar(tmp: Path) -> Path:
    return tar_of(tmp / "abs.tar", [*TWO_CLASSES, (str(tmp / "abs-evil.png"), "file", PNG)])


def truncated_tgz(keep: float) -> Callable[[Path], Path]:
    """A .tgz of the two classes cut to its first ``keep`` fraction: at 0.6 its first members
    read and then the gzip stream ends; at 0.01 it ends before the first tar header."""
    def build(tmp: Path) -> Path:
        whole = tar_of(tmp / "whole.tgz", TWO_CLASSES, "w:gz").read_bytes()
        with tarfile.open(tmp / "whole.tgz") as tf:
            assert len(tf.getnames()) == len(TWO_CLASSES)
        return _write(tmp / "cut.tgz", whole[: int(len(whole) * keep)])
    return build


def tar_cut_between_members(tmp: Path) -> Path:
    """A plain .tar cut where its fourth member's header starts: it reads as a tar of three."""
    whole = tar_of(tmp / "whole.tar", TWO_CLASSES)
    with tarfile.open(whole) as tf:
        fourth = tf.getmembers()[3]
    return _write(tmp / "cut.tar", whole.read_bytes()[: fourth.offset])


def corrupt_zip(tmp: Path) -> Path:
    """A .zip whose first member's compressed bytes are overwritten: its directory is intact."""
    path = zip_of(tmp / "damaged.zip", [(n, d) for n, _, d in TWO_CLASSES])
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        first = zf.infolist()[0]
    start = first.header_offset + 30 + len(first.filename.encode()) + 8
    data[start:start + 64] = bytes(64)
    return _write(path, bytes(data))


def checkpoint_run(make: Callable[[], Any]) -> Callable[[Ctx], Any]:
    def act(ctx: Ctx) -> Any:
        ckpt = ctx.tmp / "my-checkpoint.pth"
        torch.save(make(), ckpt)
        root = make_folder(ctx.tmp / "ds", {"a": 4, "b": 4})
        spec = tiny_spec(str(root))
        spec["model"]["weights"] = str(ckpt)
        return ctx.run(spec)
    return act


def state_dict_of(arch: str) -> Callable[[], dict]:
    def make() -> dict:
        import torchvision

        return torchvision.models.get_model(arch, weights=None).state_dict()
    return make


class NotATensor:
    """Anything but a tensor: loading it needs pickle."""

    def __init__(self) -> None:
        self.note = "needs pickle"


def pickled_checkpoint() -> dict:
    import torchvision

    return {"model": torchvision.models.resnet18().state_dict(), "meta": NotATensor()}


def yaml_file(text: str | Callable[[Path], str], within: float = 30.0) -> Callable[[Ctx], Any]:
    """Run a spec file holding ``text`` (or ``text(tmp)``), which must be refused within ``within`` s."""
    def act(ctx: Ctx) -> Any:
        path = ctx.tmp / "spec.yaml"
        path.write_text(text(ctx.tmp) if callable(text) else text, encoding="utf-8")
        t0 = time.monotonic()
        try:
            return ctx.run(path)
        finally:
            elapsed = time.monotonic() - t0
            ctx.checks.append(lambda: _took_under(elapsed, within))
    return act


def billion_laughs(levels: int = 9) -> str:
    """A valid-looking spec whose name is an alias of nine aliases of nine... : 9**9 strings."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nname: *l{levels - 1}\nseed: 0\n"


def python_tag(tmp: Path) -> str:
    return f"name: !!python/object/apply:os.system ['touch {tmp / 'pwned'}']\nseed: 0\n"


def _not_run(ctx: Ctx) -> None:
    assert not (ctx.tmp / "pwned").exists(), "the python tag was executed"


def refused_fast_python_tag(ctx: Ctx) -> Any:
    ctx.checks.append(lambda: _not_run(ctx))
    return yaml_file(python_tag, within=5)(ctx)


def submit(store: Callable[[Ctx], str], broker: Callable[[Ctx], str] | None = None) -> Callable[[Ctx], Any]:
    """Submit through the Client, to the password-protected module broker unless told otherwise."""
    def act(ctx: Ctx) -> Any:
        redis_server = ctx.request.getfixturevalue("pw_broker")
        url = broker(ctx) if broker else redis_server.url
        uri = store(ctx)
        t0 = time.monotonic()
        try:
            return Client(url, uri).submit(tiny_spec("builtin:digits"))
        finally:
            elapsed = time.monotonic() - t0
            ctx.checks.append(lambda: _nothing_in_broker(redis_server))
            ctx.checks.append(lambda: _took_under(elapsed, 30))
    return act


def _nothing_in_broker(server: RedisServer) -> None:
    import redis

    assert redis.Redis.from_url(server.url).dbsize() == 0, "a refused submission must enqueue nothing"


def _took_under(elapsed: float, limit: float) -> None:
    assert elapsed < limit, f"took {elapsed:.1f}s: refusing must not hang"


def s3_store(bucket: str = "qpipe", prefix: str = "badinput") -> Callable[[Ctx], str]:
    def uri(ctx: Ctx) -> str:
        ctx.request.getfixturevalue("s3_env")
        server = ctx.request.getfixturevalue("s3_server")
        ctx.checks.append(lambda: _bucket_prefix_empty(server, prefix))
        return f"s3://{bucket}/{prefix}"
    return uri


def _bucket_prefix_empty(server: Any, prefix: str) -> None:
    names = [o.object_name for o in server.client().list_objects("qpipe", prefix=prefix + "/", recursive=True)]
    assert names == [], f"a refused submission uploaded {names}"


def wrong_secret(ctx: Ctx) -> str:
    uri = s3_store()(ctx)
    ctx.monkeypatch.setenv("QPIPE_S3_SECRET_KEY", "WRONGSECRETwrongsecretWRONGSECRETwrong000")
    return uri


def file_store(ctx: Ctx) -> str:
    return ctx.store.uri


def unreachable_broker(ctx: Ctx) -> str:
    return f"redis://:hunter2secretpw@127.0.0.1:{free_port()}/0"


def wrong_broker_password(ctx: Ctx) -> str:
    server = ctx.request.getfixturevalue("pw_broker")
    return f"redis://:WRONGBROKERPW@127.0.0.1:{server.port}/0"


# ---- the rows

CASES: list[Case] = [
    # -- skipped: one file each in the shared dataset
    Case("truncated-png", "a PNG cut in half", "skipped", "broken image",
         file=b"cat/truncated.png", write=write_bytes(lambda: truncated("PNG"))),
    Case("truncated-jpeg", "a JPEG cut in half", "skipped", "broken image",
         file=b"cat/truncated.jpg", write=write_bytes(lambda: truncated("JPEG"))),
    Case("zero-bytes", "a 0-byte .jpg", "skipped", "empty file (0 bytes)",
         file=b"cat/zero.jpg", write=write_bytes(b"")),
    Case("text-as-png", "a text file named .png", "skipped", "not an image Pillow can read",
         file=b"cat/notes.png", write=write_bytes(b"this is not a picture\n" * 20)),
    Case("pdf-as-jpg", "a PDF named .jpg", "skipped", "not an image",
         file=b"dog/scan.jpg", write=write_bytes(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n")),
    Case("decompression-bomb", "a 60-byte PNG claiming 100000x100000 pixels", "skipped", "decompression bomb",
         file=b"cat/bomb.png", write=write_bytes(png_bomb)),
    Case("huge-image", f"a real 1200x1000 image, over data.max_image_pixels={PIXEL_LIMIT}", "skipped",
         "max_image_pixels", file=b"dog/huge.png", write=write_image(lambda: Image.new("L", (1200, 1000), 90), "PNG")),
    Case("hidden-file", "a .DS_Store in a class folder", "skipped", "hidden file",
         file=b"cat/.DS_Store", write=write_bytes(b"\0\0\0\1Bud1")),
    Case("loose-file", "a README at the dataset root, outside any class", "skipped", "file outside any class folder",
         file=b"README.txt", write=write_bytes(b"my dataset\n")),
    Case("symlink-outside", "a symlink to an image outside the dataset", "skipped",
         "symlink points outside the dataset", file=b"cat/outside.png",
         write=symlink_to(lambda root: root.parent / "outside.png")),
    Case("symlink-dir-outside", "a symlinked folder leading outside the dataset", "skipped",
         "symlink points outside the dataset", file=b"dog/elsewhere",
         write=symlink_to(lambda root: root.parent / "elsewhere")),
    Case("fifo", "a named pipe in a class folder", "skipped", "not a regular file",
         file=b"dog/pipe.png", write=make_fifo),
    Case("non-utf8-broken", "a broken file with a Latin-1 (non-UTF-8) name", "skipped", "not an image",
         file=b"dog/bro\xffken.jpg", shown="dog/bro\\xffken.jpg", write=write_bytes(b"garbage")),
    Case("empty-class-folder", "an empty class folder", "skipped", "no images", file=b"c-empty"),
    # -- converted: one file per class folder c-*, each must be counted as that class's one image
    Case("grayscale", "an 8-bit greyscale (L) PNG", "converted", file=b"c-gray/g.png",
         write=write_image(lambda: Image.new("L", (30, 20), 77), "PNG"),
         pixels=lambda a: bool(np.abs(a.astype(int) - 77).max() <= 1)),
    Case("palette", "a 16-colour palette (P) PNG", "converted", file=b"c-palette/p.png",
         write=write_image(lambda: noise(24, 24).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG")),
    Case("palette-transparent", "a palette PNG with a transparent colour", "converted", file=b"c-ptrans/p.png",
         write=write_image(palette_with_transparency, "PNG", transparency=0),
         pixels=lambda a: bool(a[:, -4:].min() >= 250 and a[:, :4, 2].min() > 200 and a[:, :4, 0].max() < 50)),
    Case("rgba", "an RGBA PNG", "converted", file=b"c-rgba/r.png",
         write=write_image(lambda: Image.new("RGBA", (20, 20), (10, 200, 30, 255)), "PNG"),
         pixels=lambda a: bool(np.abs(a.astype(int) - [10, 200, 30]).max() <= 1)),
    Case("cmyk", "a CMYK JPEG", "converted", file=b"c-cmyk/c.jpg",
         write=write_image(lambda: Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG"),
         pixels=lambda a: bool(a[..., 0].mean() > 200 and a[..., 1].mean() < 60)),  # red
    Case("16-bit", "a 16-bit greyscale PNG", "converted", file=b"c-16bit/i16.png",
         write=write_image(gradient16, "PNG"), pixels=lambda a: bool(a.min() < 30 and a.max() > 225)),
    Case("one-pixel", "a 1x1 image", "converted", file=b"c-1x1/one.png",
         write=write_image(lambda: Image.new("RGB", (1, 1), (9, 8, 7)), "PNG"),
         pixels=lambda a: bool(np.abs(a.astype(int) - [9, 8, 7]).max() <= 1)),
    Case("large-under-limit", "a 1000x990 image, just under the pixel limit", "converted", file=b"c-large/l.jpg",
         write=write_image(lambda: Image.new("RGB", (1000, 990), (200, 100, 50)), "JPEG")),
    Case("png-named-jpg", "a PNG with a .jpg extension", "converted", file=b"c-misnamed/x.jpg",
         write=write_image(lambda: noise(seed=3), "PNG")),
    Case("nested-folders", "an image three folders deep inside its class", "converted",
         file=b"c-nested/x/y/z/n.png", write=write_image(lambda: noise(seed=4), "PNG")),
    Case("non-utf8-file-name", "a valid image with a Latin-1 (non-UTF-8) file name", "converted",
         file=b"c-latin1-file/caf\xe9.png", shown="c-latin1-file/caf\\xe9.png",
         write=write_image(lambda: noise(seed=6), "PNG")),
    Case("symlink-inside", "a symlink to an image inside the dataset", "converted", file=b"c-link/in.png",
         write=symlink_to(lambda root: root / "dog" / "000.png")),
    Case("non-utf8-class-name", "a class folder with a Latin-1 (non-UTF-8) name", "converted",
         file=b"caf\xe9-class/x.png", shown="caf\\xe9-class", write=write_image(lambda: noise(seed=8), "PNG")),
    Case("utf8-names", "a class folder 'café' holding 'données 1.png' (UTF-8, accents and a space)", "converted",
         file="café/données 1.png".encode(), write=write_image(lambda: noise(seed=9), "PNG")),
    Case("cjk-class-name", "a class folder named '猫' (CJK)", "converted", file="猫/图 1.png".encode(),
         write=write_image(lambda: noise(seed=10), "PNG")),
    # -- clamped: a setting of the shared datasets' spec
    Case("calib-size-over-data", f"data.calib_size: {CALIB_ASKED}, more than the training images", "clamped",
         (f"data.calib_size={CALIB_ASKED} is more than the", "calibrated on all", "set data.calib_size to")),
    # -- an S3 prefix as the source (s3_run): its keys hold spaces and Unicode
    Case("s3-unicode-keys", f"an s3:// source ('{S3_PREFIX}/') whose keys hold spaces, accents and CJK",
         "converted", file="c-s3 猫 café/données 1.png".encode(), dataset="s3",
         write=write_image(lambda: noise(seed=12), "PNG"), marks=INTEGRATION),
    Case("s3-key-file-and-folder", "an S3 key that is also the folder of another key (x.png and x.png/y.png)",
         "skipped", "object key is also the folder of other keys", file=b"c-s3-clash/x.png", dataset="s3",
         write=write_image(lambda: noise(seed=13), "PNG"), marks=INTEGRATION),
    # -- failed-stage: the dataset or the checkpoint is only looked at by a worker
    Case("single-class", "a dataset with one class folder", "failed-stage",
         ("at least 2 are needed", "add one sub-folder of images per class"),
         stage="ingest", act=dataset_run(lambda t: make_folder(t / "one", {"only": 6}))),
    Case("empty-split", "two classes of one image each (nothing left for validation)", "failed-stage",
         ("validation split is empty", "add images, raise data.val_fraction"), stage="ingest",
         act=dataset_run(lambda t: make_folder(t / "two", {"a": 1, "b": 1}))),
    Case("tar-dotdot", "a .tar with a ../ member", "failed-stage",
         ("unsafe member path '../evil.png'", "rebuild the archive with relative paths"), stage="ingest",
         act=dataset_run(lambda t: tar_of(t / "dotdot.tar", [*TWO_CLASSES, ("../evil.png", "file", PNG)]))),
    Case("tar-absolute", "a .tar with an absolute member path", "failed-stage", "unsafe member path",
         stage="ingest", act=dataset_run(abs_member_tar)),
    Case("tar-symlink", "a .tar holding a symlink to /etc/passwd", "failed-stage",
         ("holds a link 'a/l.png' -> '/etc/passwd'", "store real files instead"), stage="ingest",
         act=dataset_run(lambda t: tar_of(t / "link.tar", [*TWO_CLASSES, ("a/l.png", "symlink", "/etc/passwd")]))),
    Case("zip-dotdot", "a .zip with a ../ member", "failed-stage", "unsafe member path", stage="ingest",
         act=dataset_run(lambda t: zip_of(t / "dotdot.zip", [*[(n, d) for n, _, d in TWO_CLASSES],
                                                              ("../evil.png", PNG)]))),
    Case("archive-too-big", "a 30 KB .tar.gz expanding to 8 MB, over data.max_archive_bytes=1000000",
         "failed-stage", ("expands past data.max_archive_bytes=1000000", "raise the limit or split the dataset"),
         stage="ingest", act=dataset_run(
             lambda t: tar_of(t / "bomb.tar.gz", [*TWO_CLASSES, ("a/zeros.png", "file", b"\0" * (8 << 20))],
                                  "w:gz"), max_archive_bytes=1_000_000)),
    Case("not-an-archive", "a text file named .tar", "failed-stage", "not a readable tar or zip", stage="ingest",
         act=dataset_run(lambda t: _write(t / "fake.tar", b"definitely not a tar\n" * 50))),
    Case("tgz-not-gzip", "a text file named .tgz", "failed-stage",
         ("fake.tgz is not a readable tar or zip archive (no tar header and no gzip", "tar -czf data.tgz FOLDER"),
         stage="ingest", act=dataset_run(lambda t: _write(t / "fake.tgz", b"definitely not gzip\n" * 50))),
    Case("tgz-truncated", "a .tgz cut at 60% (a partial download)", "failed-stage",
         ("archive cut.tgz is truncated or corrupt", "copy or download it again"), stage="ingest",
         act=dataset_run(truncated_tgz(0.6))),
    Case("tgz-truncated-header", "a .tgz cut before its first tar header", "failed-stage",
         ("archive cut.tgz is truncated or corrupt", "copy or download it again"), stage="ingest",
         act=dataset_run(truncated_tgz(0.01))),
    Case("tar-truncated-between-members", "a plain .tar cut where a member's header starts", "failed-stage",
         ("archive cut.tar is truncated or corrupt (it stops after 3 member(s), with no end-of-archive marker)",
          "copy or download it again"), stage="ingest", act=dataset_run(tar_cut_between_members)),
    Case("zip-corrupt", "a .zip with a damaged member", "failed-stage",
         ("archive damaged.zip is corrupt", "re-create or re-download it"), stage="ingest",
         act=dataset_run(corrupt_zip)),
    Case("tar-symlink-relative", "a .tar holding a symlink ../../../etc/passwd", "failed-stage",
         ("holds a link 'a/l.png' -> '../../../etc/passwd'", "store real files instead"), stage="ingest",
         act=dataset_run(lambda t: tar_of(t / "rel.tar",
                                           [*TWO_CLASSES, ("a/l.png", "symlink", "../../../etc/passwd")]))),
    Case("zip-symlink", "a .zip holding a symlink to /etc/passwd", "failed-stage",
         ("holds a symlink 'a/l.png'", "store real files instead"), stage="ingest",
         act=dataset_run(lambda t: zip_of(t / "link.zip", [(n, d) for n, _, d in TWO_CLASSES],
                                          symlink=("a/l.png", "/etc/passwd")))),
    Case("checkpoint-other-arch", "a mobilenet_v2 state_dict for model.arch resnet18", "failed-stage",
         ("does not fit resnet18", "check model.arch matches the checkpoint"), stage="finetune",
         act=checkpoint_run(state_dict_of("mobilenet_v2"))),
    Case("checkpoint-other-arch-same-names", "a resnet50 state_dict (same key names, other shapes) for resnet18",
         "failed-stage", "does not fit resnet18", stage="finetune", act=checkpoint_run(state_dict_of("resnet50"))),
    Case("checkpoint-needs-pickle", "a checkpoint holding a custom class instance", "failed-stage",
         ("weights_only=True", "save a plain state_dict"), stage="finetune", act=checkpoint_run(pickled_checkpoint)),
    # -- refused: the spec
    Case("unknown-key", "a spec with an unknown top-level key", "refused",
         "surprise: unknown key in the top level: remove it", act=spec_with(surprise=1), error=SpecError),
    Case("unknown-nested-key", "finetune.epoch (typo of epochs)", "refused",
         "finetune.epoch: unknown key in finetune", act=spec_with(**{"finetune.epoch": 2}), error=SpecError),
    Case("zero-epochs", "finetune.epochs: 0", "refused", "finetune.epochs: Input should be greater than or equal to 1",
         act=spec_with(**{"finetune.epochs": 0}), error=SpecError),
    Case("negative-epochs", "finetune.epochs: -3", "refused", "finetune.epochs: Input should be greater than",
         act=spec_with(**{"finetune.epochs": -3}), error=SpecError),
    Case("qat-zero-epochs", "a qat variant with epochs: 0", "refused", "quantize.variants.0.epochs",
         act=spec_with(**{"quantize.variants": [{"name": "q", "method": "qat", "epochs": 0}]}), error=SpecError),
    Case("unknown-arch", "model.arch: resnt18", "refused", "unknown arch 'resnt18': did you mean resnet18",
         act=spec_with(**{"model.arch": "resnt18"}), error=SpecError),
    Case("unknown-weights", "model.weights: IMAGENET9K_V7", "refused",
         "weights 'IMAGENET9K_V7' do not exist for resnet18: use one of DEFAULT, IMAGENET1K_V1",
         act=spec_with(**{"model.weights": "IMAGENET9K_V7"}), error=SpecError),
    Case("missing-checkpoint", "model.weights: a .pt file that does not exist", "refused",
         ("does not exist", "give a local .pt/.pth state_dict file"),
         act=spec_with(**{"model.weights": "/nonexistent/dir/model.pt"})),
    Case("name-with-slash", "name: team/run", "refused", "without '/' or '..'", act=spec_with(name="team/run"),
         error=SpecError),
    Case("name-dotdot", "name: ..", "refused", "without '/' or '..'", act=spec_with(name=".."), error=SpecError),
    Case("name-dotdot-inside", "name: a..b", "refused", "without '/' or '..'", act=spec_with(name="a..b"),
         error=SpecError),
    Case("image-size-too-small", "data.image_size: 8", "refused", "data.image_size",
         act=spec_with(**{"data.image_size": 8}), error=SpecError),
    Case("val-fraction-one", "data.val_fraction: 1.0", "refused", "data.val_fraction",
         act=spec_with(**{"data.val_fraction": 1.0}), error=SpecError),
    Case("unknown-builtin", "data.source: builtin:cifar10", "refused", "the only one is builtin:digits",
         act=spec_with(**{"data.source": "builtin:cifar10"}), error=SpecError),
    Case("http-source", "data.source: an http:// URL", "refused", "unsupported URI scheme",
         act=spec_with(**{"data.source": "http://example.com/data.tar"}), error=SpecError),
    Case("missing-source", "data.source: a folder that does not exist", "refused",
         ("/nonexistent/dataset does not exist", "give an existing folder or archive"),
         act=spec_with(**{"data.source": "/nonexistent/dataset"})),
    Case("observer-on-dynamic", "an observer on a dynamic variant", "refused", "observer is only used by method: "
         "static", act=spec_with(**{"quantize.variants": [{"name": "d", "method": "dynamic", "observer": "minmax"}]}),
         error=SpecError),
    Case("duplicate-variants", "two variants with the same name", "refused", "is used twice",
         act=spec_with(**{"quantize.variants": [{"name": "d", "method": "dynamic"}] * 2}), error=SpecError),
    Case("no-variants", "quantize.variants: []", "refused", "quantize.variants",
         act=spec_with(**{"quantize.variants": []}), error=SpecError),
    Case("bad-yaml", "a spec file that is not valid YAML", "refused", "not valid YAML",
         act=yaml_file("name: [unclosed\nseed: 0\n"), error=SpecError),
    Case("yaml-alias-bomb", "a spec file of nested aliases expanding to 9**9 values (billion laughs)", "refused",
         ("expands to over 100000 values through its aliases", "write the values out"),
         act=yaml_file(billion_laughs(), within=2), error=SpecError),
    Case("yaml-alias-loop", "a spec file whose alias holds itself", "refused",
         ("the alias *a refers to a node that holds it", "write the values out"),
         act=yaml_file("name: &a [x, *a]\n", within=2), error=SpecError),
    Case("yaml-deep-nesting", "a spec file nested 100000 lists deep", "refused",
         ("nested more than 32 levels deep", "not a spec"), act=yaml_file("name: " + "[" * 100_000, within=2),
         error=SpecError),
    Case("yaml-python-tag", "a spec file with !!python/object/apply:os.system", "refused",
         ("the tag !!python/object/apply:os.system is not allowed", "remove the tag"),
         act=refused_fast_python_tag, error=SpecError),
    Case("yaml-unknown-tag", "a spec file with a custom tag (!secret x)", "refused",
         ("the tag !secret is not allowed", "remove the tag"), act=yaml_file("name: !secret x\n"), error=SpecError),
    Case("huge-spec-file", "a 2 MB spec file", "refused", ("over the limit of 1048576", "check that this is the spec"),
         act=yaml_file("name: x\n" + "# padding\n" * 200_000), error=SpecError),
    # -- refused: absurd values, each naming the field, the value and the allowed range
    Case("epochs-billion", "finetune.epochs: 10**9", "refused",
         ("finetune.epochs", "(got 1000000000)", "allowed range: 1 <= finetune.epochs <= 1000"),
         act=spec_with(**{"finetune.epochs": 10**9}), error=SpecError),
    Case("image-size-huge", "data.image_size: 100000", "refused",
         ("data.image_size", "(got 100000)", "allowed range: 16 <= data.image_size <= 1024"),
         act=spec_with(**{"data.image_size": 100_000}), error=SpecError),
    Case("calib-size-huge", "data.calib_size: 10**9", "refused",
         ("data.calib_size", "(got 1000000000)", "allowed range: 1 <= data.calib_size <= 100000"),
         act=spec_with(**{"data.calib_size": 10**9}), error=SpecError),
    Case("lr-nan", "finetune.lr: .nan", "refused", ("finetune.lr", "(got nan)", "0.0 < finetune.lr <= 10.0"),
         act=yaml_file("name: x\nfinetune: {lr: .nan}\nquantize: {variants: [{name: d, method: dynamic}]}\n"),
         error=SpecError),
    Case("weight-decay-huge", "finetune.weight_decay: 50", "refused",
         ("finetune.weight_decay", "(got 50)", "0.0 <= finetune.weight_decay <= 1.0"),
         act=spec_with(**{"finetune.weight_decay": 50}), error=SpecError),
    Case("too-many-batch-sizes", "benchmark.batch_sizes: 1..100", "refused",
         ("benchmark.batch_sizes", "at most 16 items"), act=spec_with(**{"benchmark.batch_sizes": list(range(1, 101))}),
         error=SpecError),
    # -- refused: the store and the broker (through Client.submit)
    Case("missing-bucket", "an s3:// store whose bucket does not exist", "refused",
         ("bucket 'no-such-bucket' does not exist", "create it"), act=submit(s3_store("no-such-bucket")),
         marks=INTEGRATION),
    Case("wrong-s3-secret", "a wrong QPIPE_S3_SECRET_KEY", "refused",
         ("refused the credentials", "check QPIPE_S3_ACCESS_KEY and QPIPE_S3_SECRET_KEY"),
         act=submit(wrong_secret), marks=INTEGRATION),
    Case("unreachable-broker", "a broker URL where nothing listens", "refused",
         ("cannot reach the broker", "fix --broker / QPIPE_BROKER_URL"),
         act=submit(file_store, broker=unreachable_broker), marks=INTEGRATION),
    Case("wrong-broker-password", "a broker URL with the wrong password", "refused",
         ("refused the password", "check the URL"),
         act=submit(file_store, broker=wrong_broker_password), marks=INTEGRATION),
    Case("non-redis-broker", "an amqp:// broker URL", "refused",
         ("is not a Redis/Valkey URL", "use redis://HOST:PORT/DB"),
         act=submit(file_store, broker=lambda ctx: "amqp://guest:guestpw@127.0.0.1:5672//"), marks=INTEGRATION),
]
OUTCOMES = ("refused", "skipped", "converted", "clamped", "failed-stage")
SECRETS = ("WRONGSECRET", "hunter2secretpw", "WRONGBROKERPW", "guestpw")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def pw_broker(tmp_path_factory: pytest.TempPathFactory):
    with RedisServer(data_dir=tmp_path_factory.mktemp("pw-broker"), password="BadInputBrokerPw") as server:
        yield server


def shared_rows(dataset: str) -> list[Case]:
    return [c for c in CASES if c.dataset == dataset and c.outcome in ("skipped", "converted")]


def write_rows(root: Path, rows: list[Case]) -> None:
    for case in rows:
        path = os.fsencode(root) + b"/" + case.file
        if case.write is None:  # a folder and nothing in it
            os.makedirs(path)
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        case.write(path, root)


def run_shared(tmp: Path, source: str, whole: bool = True) -> dict:
    """Run the shared datasets' spec on ``source`` (the whole pipeline, or its ingest stage
    only); return the summary (None for ingest only), the ingest manifest and the training
    images as stored."""
    store = FileStore(tmp / "store")
    spec = load_spec(tiny_spec(source, max_image_pixels=PIXEL_LIMIT, calib_size=CALIB_ASKED))
    summary = report = None
    if whole:
        summary = run_in_process(spec, store)
        report = store.get_bytes(store.key_of(summary["report"])).decode("utf-8")
        [ingest_key] = [k.split("/")[2] for k in store.list("stages/ingest") if k.endswith("/manifest.json")]
        manifest = store.get_json(f"stages/ingest/{ingest_key}/manifest.json")
    else:
        [node] = [n for n in build_plan(spec, prepare_sources(spec, store)) if n["stage"] == "ingest"]
        manifest = execute(node, store, run_id="bad-input-s3").manifest
    xs, ys = [], []
    for i, ref in enumerate(manifest["outputs"]["train"]):
        shard = torch.load(store.fetch(ref, tmp / f"train-{i}.pt"), weights_only=True)
        xs.append(shard["images"])
        ys.append(shard["labels"])
    x, y = torch.cat(xs), torch.cat(ys)
    return {"summary": summary, "manifest": manifest, "store": store, "x": x, "y": y, "report": report}


@pytest.fixture(scope="module")
def main_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One folder holding every skipped/converted row's file, run through the whole pipeline once."""
    tmp = tmp_path_factory.mktemp("main")
    root = make_folder(tmp / "ds", {"cat": GOOD_PER_CLASS, "dog": GOOD_PER_CLASS})
    noise(seed=99).save(tmp / "outside.png")
    (tmp / "elsewhere").mkdir()
    noise(seed=98).save(tmp / "elsewhere" / "x.png")
    write_rows(root, shared_rows("main"))
    return run_shared(tmp, str(root))


@pytest.fixture(scope="module")
def s3_run(tmp_path_factory: pytest.TempPathFactory, s3_server: Any, s3_env: dict) -> dict:
    """The S3 rows' objects under one prefix, next to two classes of good images whose keys hold
    spaces, ingested once from data.source s3://qpipe/PREFIX/. Only the ingest stage reads the
    source, so only it runs: what comes after it is main_run's."""
    tmp = tmp_path_factory.mktemp("s3")
    root = make_folder(tmp / "ds", {"cat": GOOD_PER_CLASS, "dog": GOOD_PER_CLASS})
    write_rows(root, shared_rows("s3"))
    client = s3_server.client()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        key = f"{S3_PREFIX}/{rel.replace('/0', '/image 0')}"  # cat/000.png -> cat/image 000.png
        client.fput_object("qpipe", key, str(path))
    # x.png is an object and the folder of another one, as S3 allows and a disk does not
    client.put_object("qpipe", f"{S3_PREFIX}/c-s3-clash/x.png/y.png", io.BytesIO(PNG), len(PNG))
    return run_shared(tmp, f"s3://qpipe/{S3_PREFIX}/", whole=False)


# ---------------------------------------------------------------------------------- checks

def stage_folders_complete(store: FileStore) -> None:
    """No partial output: every stages/{stage}/{key}/ folder holds a manifest.json."""
    folders = {tuple(k.split("/")[:3]) for k in store.list("stages")}
    incomplete = sorted("/".join(f) for f in folders if not store.exists("/".join(f) + "/manifest.json"))
    assert incomplete == [], f"partial outputs left behind: {incomplete}"


def check_ingested(case: Case, run: dict) -> None:
    """What the ingest stage of a shared run must have made of the row's file or setting."""
    manifest = run["manifest"]
    for c in ("cat", "dog"):  # nothing skipped was counted
        assert manifest["counts"]["train"][c] + manifest["counts"]["val"][c] == GOOD_PER_CLASS
    if case.outcome == "clamped":
        sizes = manifest["sizes"]
        assert sizes["calib"] == sizes["train"] < CALIB_ASKED, sizes  # every training image, once
        assert manifest["counts"]["calib"] == manifest["counts"]["train"]
        [note] = manifest["notes"]
        assert f"the {sizes['train']} training images" in note and all(e in note for e in case.expected), note
        return
    skipped = {s["file"]: s["reason"] for s in manifest["skipped"]}
    shown = case.shown or case.file.decode()
    if case.outcome == "skipped":
        assert shown in skipped, f"{shown} not in data.skipped: {sorted(skipped)}"
        assert all(e in skipped[shown] for e in case.expected), skipped[shown]
        return
    cls = shown.split("/")[0]
    assert not any(f.startswith(cls + "/") for f in skipped), skipped
    assert cls in manifest["classes"], manifest["classes"]
    assert manifest["counts"]["train"][cls] == 1 and manifest["counts"]["val"][cls] == 0
    image = run["x"][run["y"] == manifest["classes"].index(cls)]
    assert image.shape == (1, 3, SIZE, SIZE) and image.dtype == torch.uint8
    if case.pixels is not None:
        assert case.pixels(image[0].permute(1, 2, 0).numpy()), image[0].permute(1, 2, 0).numpy()[::4, ::4]


def check_whole_run(case: Case, run: dict) -> None:
    """What the run summary and report.md of main_run must say about the row."""
    summary, manifest = run["summary"], run["manifest"]
    assert summary["status"] == "SUCCESS" and summary["failures"] == [], "bad files must never stop the ingest"
    stage_folders_complete(run["store"])
    skipped = {s["file"]: s["reason"] for s in summary["data"]["skipped"]}
    assert skipped == {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert summary["data"]["class_names"] == manifest["classes"]
    assert summary["data"]["notes"] == manifest["notes"]
    shown = case.shown or case.file.decode()
    if case.outcome == "skipped":
        assert f"- `{shown}`: {skipped[shown]}" in run["report"]  # and report.md lists it


def check_failed_stage(case: Case, ctx: Ctx, summary: dict) -> None:
    assert summary["status"] == "FAILED"
    first, *rest = summary["failures"]
    assert first["stage"] == case.stage, summary["failures"]
    assert all(e in first["error"] for e in case.expected), first["error"]
    # everything else that failed only failed because this stage did: each was not run, naming a node
    # that failed before it (the run engine records the chain, in process as on workers)
    failed = {first["node"]}
    for f in rest:
        assert f["error"].startswith("not run: upstream "), rest
        assert f["error"].removeprefix("not run: upstream ").removesuffix(" did not finish") in failed, rest
        failed.add(f["node"])
    assert summary["baseline"] is None and all(v["status"] == "FAILED" for v in summary["variants"])
    stage_folders_complete(ctx.store)
    done = {k.split("/")[1] for k in ctx.store.list("stages")}
    upstream = {"finetune": {"ingest"}, "ingest": set()}[case.stage]
    assert done == upstream, f"stages with outputs: {done}"  # upstream intact, nothing downstream ran
    assert ctx.store.exists(f"runs/{summary['run_id']}/summary.json")


# ------------------------------------------------------------------------------------ test

@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_input(case: Case, request: pytest.FixtureRequest, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    assert case.outcome in OUTCOMES
    if case.outcome in ("skipped", "converted", "clamped"):
        run = request.getfixturevalue(f"{case.dataset}_run")
        check_ingested(case, run)
        if case.dataset == "main":
            check_whole_run(case, run)
        return
    assert case.act is not None
    ctx = Ctx(tmp_path, request, monkeypatch, FileStore(tmp_path / "store"))
    if case.outcome == "failed-stage":
        check_failed_stage(case, ctx, case.act(ctx))
        assert not (tmp_path / "abs-evil.png").exists() and not (tmp_path / "evil.png").exists()
        return
    with pytest.raises(case.error) as info:
        case.act(ctx)
    message = str(info.value)
    assert all(e in message for e in case.expected), message
    assert not any(s in message for s in SECRETS), message
    if "s3_env" in request.fixturenames:
        assert request.getfixturevalue("s3_env")["QPIPE_S3_SECRET_KEY"] not in message
    assert [p for p in (tmp_path / "store").rglob("*") if p.is_file()] == [], "refused, yet something was written"
    for check in ctx.checks:
        check()


def test_table_is_big_and_covers_every_outcome() -> None:
    outcomes = [c.outcome for c in CASES]
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
    assert set(outcomes) == set(OUTCOMES)
    assert all(c.input and (c.expect or c.outcome == "converted") for c in CASES)
    assert all(c.dataset == "main" or (c.outcome in ("skipped", "converted") and INTEGRATION[0] in c.marks)
               for c in CASES)
    load_spec(tiny_spec("builtin:digits"))  # the base spec itself is valid
