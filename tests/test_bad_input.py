"""Bad input, end to end: one table of everything a user may get wrong, each row naming the
input and what qpipe must do with it.

Outcomes:
- ``refused``: SpecError/ConfigError before anything is enqueued or written; the message names
  the problem and the fix (checked by substring).
- ``skipped``: ingest leaves the file out and lists it, with its reason, in ``data.skipped``;
  the run still succeeds.
- ``converted``: the image is decoded to RGB and ingested (counted in its class), not refused.
- ``failed-stage``: the run ends FAILED with one failed stage naming the cause; stages that
  do not depend on it are unaffected, downstream ones are not run, and no partial output is
  left (every ``stages/{stage}/{key}/`` folder in the store holds a ``manifest.json``).

Every ``skipped``/``converted`` row is one file (or folder) of a single dataset that is run
through the whole pipeline once (``main_run``), so the table costs one run; every other row runs
on its own. Decision for checkpoints: a state_dict whose head size differs from the dataset's
class count is a backbone and gets a new head (not an error), so the mismatched-checkpoint rows
use checkpoints of a *different arch*, which must fail naming the arch.
"""

from __future__ import annotations

import io
import os
import struct
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
from pipeline.runner import run_in_process
from pipeline.spec import load_spec
from pipeline.store import FileStore
from tests.test_data import _tar, make_folder, noise  # the tests' one tar, ImageFolder and image builders
from workers.client import Client
from workers.servers import RedisServer, free_port

SIZE = 16
PIXEL_LIMIT = 1_000_000  # data.max_image_pixels of the shared dataset's spec
GOOD_PER_CLASS = 6  # decodable images in each of the two main classes


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

def encoded(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


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
    outcome: str  # refused | skipped | converted | failed-stage
    expect: str | tuple[str, ...] = ""  # substring(s) of the reason / error message (problem and fix)
    # skipped / converted: a path (bytes) in the shared dataset and what writes it there
    file: bytes = b""
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
    return _tar(tmp / "abs.tar", [*TWO_CLASSES, (str(tmp / "abs-evil.png"), "file", PNG)])


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


def yaml_file(text: str) -> Callable[[Ctx], Any]:
    def act(ctx: Ctx) -> Any:
        path = ctx.tmp / "spec.yaml"
        path.write_text(text)
        return ctx.run(path)
    return act


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
    # -- failed-stage: the dataset or the checkpoint is only looked at by a worker
    Case("single-class", "a dataset with one class folder", "failed-stage",
         ("at least 2 are needed", "add one sub-folder of images per class"),
         stage="ingest", act=dataset_run(lambda t: make_folder(t / "one", {"only": 6}))),
    Case("empty-split", "two classes of one image each (nothing left for validation)", "failed-stage",
         ("validation split is empty", "add images, raise data.val_fraction"), stage="ingest",
         act=dataset_run(lambda t: make_folder(t / "two", {"a": 1, "b": 1}))),
    Case("tar-dotdot", "a .tar with a ../ member", "failed-stage",
         ("unsafe member path '../evil.png'", "rebuild the archive with relative paths"), stage="ingest",
         act=dataset_run(lambda t: _tar(t / "dotdot.tar", [*TWO_CLASSES, ("../evil.png", "file", PNG)]))),
    Case("tar-absolute", "a .tar with an absolute member path", "failed-stage", "unsafe member path",
         stage="ingest", act=dataset_run(abs_member_tar)),
    Case("tar-symlink", "a .tar holding a symlink to /etc/passwd", "failed-stage",
         ("holds a link 'a/l.png' -> '/etc/passwd'", "store real files instead"), stage="ingest",
         act=dataset_run(lambda t: _tar(t / "link.tar", [*TWO_CLASSES, ("a/l.png", "symlink", "/etc/passwd")]))),
    Case("zip-dotdot", "a .zip with a ../ member", "failed-stage", "unsafe member path", stage="ingest",
         act=dataset_run(lambda t: _zip(t / "dotdot.zip", [*[(n, d) for n, _, d in TWO_CLASSES],
                                                            ("../evil.png", PNG)]))),
    Case("archive-too-big", "a 30 KB .tar.gz expanding to 8 MB, over data.max_archive_bytes=1000000",
         "failed-stage", ("expands past data.max_archive_bytes=1000000", "raise the limit or split the dataset"),
         stage="ingest", act=dataset_run(
             lambda t: _tar(t / "bomb.tar.gz", [*TWO_CLASSES, ("a/zeros.png", "file", b"\0" * (8 << 20))],
                                "w:gz"), max_archive_bytes=1_000_000)),
    Case("not-an-archive", "a text file named .tar", "failed-stage", "not a readable tar or zip", stage="ingest",
         act=dataset_run(lambda t: _write(t / "fake.tar", b"definitely not a tar\n" * 50))),
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
SECRETS = ("WRONGSECRET", "hunter2secretpw", "WRONGBROKERPW", "guestpw")


def _zip(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def pw_broker(tmp_path_factory: pytest.TempPathFactory):
    with RedisServer(data_dir=tmp_path_factory.mktemp("pw-broker"), password="BadInputBrokerPw") as server:
        yield server


@pytest.fixture(scope="module")
def main_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One dataset holding every skipped/converted row's file, run through the whole pipeline once."""
    tmp = tmp_path_factory.mktemp("main")
    root = make_folder(tmp / "ds", {"cat": GOOD_PER_CLASS, "dog": GOOD_PER_CLASS})
    noise(seed=99).save(tmp / "outside.png")
    (tmp / "elsewhere").mkdir()
    noise(seed=98).save(tmp / "elsewhere" / "x.png")
    for case in CASES:
        if case.outcome not in ("skipped", "converted"):
            continue
        path = os.fsencode(root) + b"/" + case.file
        if case.write is None:  # a folder and nothing in it
            os.makedirs(path)
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        case.write(path, root)
    store = FileStore(tmp / "store")
    summary = run_in_process(tiny_spec(str(root), max_image_pixels=PIXEL_LIMIT), store)
    [ingest_key] = [k.split("/")[2] for k in store.list("stages/ingest") if k.endswith("/manifest.json")]
    manifest = store.get_json(f"stages/ingest/{ingest_key}/manifest.json")
    xs, ys = [], []
    for i, ref in enumerate(manifest["outputs"]["train"]):
        shard = torch.load(store.fetch(ref, tmp / f"train-{i}.pt"), weights_only=True)
        xs.append(shard["images"])
        ys.append(shard["labels"])
    x, y = torch.cat(xs), torch.cat(ys)
    report = store.get_bytes(store.key_of(summary["report"])).decode("utf-8")
    return {"summary": summary, "manifest": manifest, "store": store, "x": x, "y": y, "report": report}


# ---------------------------------------------------------------------------------- checks

def stage_folders_complete(store: FileStore) -> None:
    """No partial output: every stages/{stage}/{key}/ folder holds a manifest.json."""
    folders = {tuple(k.split("/")[:3]) for k in store.list("stages")}
    incomplete = sorted("/".join(f) for f in folders if not store.exists("/".join(f) + "/manifest.json"))
    assert incomplete == [], f"partial outputs left behind: {incomplete}"


def check_in_main_run(case: Case, run: dict) -> None:
    summary, manifest = run["summary"], run["manifest"]
    assert summary["status"] == "SUCCESS" and summary["failures"] == [], "bad files must never stop the ingest"
    stage_folders_complete(run["store"])
    skipped = {s["file"]: s["reason"] for s in summary["data"]["skipped"]}
    assert skipped == {s["file"]: s["reason"] for s in manifest["skipped"]}
    for c in ("cat", "dog"):  # nothing skipped was counted
        assert manifest["counts"]["train"][c] + manifest["counts"]["val"][c] == GOOD_PER_CLASS
    shown = case.shown or case.file.decode()
    if case.outcome == "skipped":
        assert shown in skipped, f"{shown} not in data.skipped: {sorted(skipped)}"
        assert all(e in skipped[shown] for e in case.expected), skipped[shown]
        assert f"- `{shown}`: {skipped[shown]}" in run["report"]  # and report.md lists it
        return
    cls = shown.split("/")[0]
    assert not any(f.startswith(cls + "/") for f in skipped), skipped
    assert cls in manifest["classes"], manifest["classes"]
    cls.encode("utf-8")
    assert summary["data"]["class_names"] == manifest["classes"]
    assert manifest["counts"]["train"][cls] == 1 and manifest["counts"]["val"][cls] == 0
    image = run["x"][run["y"] == manifest["classes"].index(cls)]
    assert image.shape == (1, 3, SIZE, SIZE) and image.dtype == torch.uint8
    if case.pixels is not None:
        assert case.pixels(image[0].permute(1, 2, 0).numpy()), image[0].permute(1, 2, 0).numpy()[::4, ::4]


def check_failed_stage(case: Case, ctx: Ctx, summary: dict) -> None:
    assert summary["status"] == "FAILED"
    first, *rest = summary["failures"]
    assert first["stage"] == case.stage, summary["failures"]
    assert all(e in first["error"] for e in case.expected), first["error"]
    # everything else that failed only failed because this stage did
    assert all(f["stage"] == "benchmark" and f["error"] == "no benchmark result" for f in rest), rest
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
    assert case.outcome in ("refused", "skipped", "converted", "failed-stage")
    if case.outcome in ("skipped", "converted"):
        check_in_main_run(case, request.getfixturevalue("main_run"))
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
    assert set(outcomes) == {"refused", "skipped", "converted", "failed-stage"}
    assert all(c.input and (c.expect or c.outcome == "converted") for c in CASES)
    load_spec(tiny_spec("builtin:digits"))  # the base spec itself is valid
