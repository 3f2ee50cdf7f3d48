"""Dataset ingestion: decoding every kind of file a user may have, archive safety, the
folder -> tar -> store -> worker path, the stratified split and the ingest stage's manifest.

All images are generated here (Pillow, numpy); tiny sizes keep the file fast.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import Preprocess, decode_image, read_image_folder, safe_extract, stratified_split
from pipeline.errors import ConfigError
from pipeline.plan import build_plan
from pipeline.sources import SKIPPED_MEMBER, folder_to_tar, materialize_source, prepare_source, prepare_sources
from pipeline.spec import parse_spec
from pipeline.stages import execute
from pipeline.store import FileStore
from tests.helpers import encoded, make_folder, noise, tar_of, zip_of

SIZE = 16
PRE = Preprocess(resize=SIZE, crop=SIZE)
BIG_LIMIT = 50_000_000  # the spec's default data.max_image_pixels


# ----------------------------------------------------------------------------------- helpers

def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def ingest(tmp_path: Path, source: Path, **data: object) -> tuple[dict, FileStore]:
    """Run the ingest stage of a plan built from a spec whose data.source is ``source``."""
    spec = parse_spec({"name": "ingest-test", "seed": 0,
                       "data": {"source": str(source), "image_size": SIZE, **data},
                       "quantize": {"variants": [{"name": "dyn", "method": "dynamic"}]}})
    store = FileStore(tmp_path / "store")
    plan = build_plan(spec, prepare_sources(spec, store))
    node = plan[0]
    assert node["stage"] == "ingest"
    return execute(node, store, run_id="test").manifest, store


def read(root: Path, max_pixels: int = BIG_LIMIT) -> tuple[list[str], list[np.ndarray], list[int], dict[str, str]]:
    skipped: list[dict] = []
    classes, split = read_image_folder(root, PRE, max_pixels, skipped)
    return classes, split.images, split.labels, {s["file"]: s["reason"] for s in skipped}


# ------------------------------------------------------------------------- broken files

def _truncated(fmt: str) -> bytes:
    data = encoded(noise(64, 64), fmt)
    return data[: len(data) // 2]


REFUSED_FILES = [
    ("truncated-jpeg", "bad.jpg", lambda: _truncated("JPEG"), "broken image"),
    ("truncated-png", "bad.png", lambda: _truncated("PNG"), "broken image"),
    ("zero-bytes", "bad.jpg", lambda: b"", "empty file"),
    ("text-named-jpg", "bad.jpg", lambda: b"this is not a picture\n" * 10, "not an image"),
    ("png-header-only", "bad.png", lambda: encoded(noise(), "PNG")[:33], "not an image"),
]


@pytest.mark.parametrize(("name", "content", "reason"),
                         [pytest.param(n, c, r, id=i) for i, n, c, r in REFUSED_FILES])
def test_broken_file_is_skipped_with_reason(tmp_path: Path, name: str, content, reason: str) -> None:
    root = make_folder(tmp_path / "ds", {"a": 2, "b": 2})
    (root / "a" / name).write_bytes(content())
    classes, images, labels, skipped = read(root)
    assert classes == ["a", "b"]
    assert len(images) == 4 and labels == [0, 0, 1, 1]
    assert list(skipped) == [f"a/{name}"]
    assert reason in skipped[f"a/{name}"]


@pytest.mark.parametrize(("w", "h"), [(40, 40), (200, 200)], ids=["just-over-limit", "far-over-limit"])
def test_decompression_bomb_is_skipped(tmp_path: Path, w: int, h: int) -> None:
    """Over data.max_image_pixels (and, far over, past Pillow's own 2x error threshold)."""
    root = make_folder(tmp_path / "ds", {"a": 2, "b": 2})
    Image.new("RGB", (w, h), (1, 2, 3)).save(root / "b" / "bomb.png")
    pillow_limit = Image.MAX_IMAGE_PIXELS
    _, images, _, skipped = read(root, max_pixels=1000)
    assert len(images) == 4
    reason = skipped["b/bomb.png"]
    assert "bomb" in reason or "max_image_pixels" in reason
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # the process-wide Pillow limit is restored


def _gradient16() -> Image.Image:
    arr = np.tile(np.linspace(0, 65535, 24).astype(np.uint16), (24, 1))
    img = Image.fromarray(arr)
    assert img.mode in ("I;16", "I;16L", "I")
    return img


CONVERTED = [
    ("grayscale-L", "g.png", lambda: Image.new("L", (30, 20), 77)),
    ("palette-P", "p.png", lambda: noise(24, 24).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)),
    ("rgba", "r.png", lambda: Image.new("RGBA", (20, 20), (10, 200, 30, 255))),
    ("cmyk-jpeg", "c.jpg", lambda: Image.new("CMYK", (20, 20), (0, 255, 255, 0))),
    ("16-bit-png", "i16.png", _gradient16),
    ("one-pixel", "one.png", lambda: Image.new("RGB", (1, 1), (9, 8, 7))),
    ("large-3000x2000", "big.png", lambda: Image.new("RGB", (3000, 2000), (200, 100, 50))),
    ("tall-2x300", "tall.png", lambda: Image.new("RGB", (2, 300), (5, 5, 5))),
]


@pytest.mark.parametrize(("name", "make"), [pytest.param(n, m, id=i) for i, n, m in CONVERTED])
def test_unusual_images_are_converted_to_rgb(tmp_path: Path, name: str, make) -> None:
    root = make_folder(tmp_path / "ds", {"a": 1, "b": 1})
    img = make()
    img.save(root / "a" / name)
    with Image.open(root / "a" / name) as check:
        assert check.mode == img.mode  # the file keeps its unusual mode on disk
    _, images, labels, skipped = read(root)
    assert skipped == {}
    assert len(images) == 3 and labels.count(0) == 2
    arr = decode_image(root / "a" / name, PRE, BIG_LIMIT)
    assert arr.shape == (SIZE, SIZE, 3) and arr.dtype == np.uint8


def test_rgba_and_cmyk_colours_survive(tmp_path: Path) -> None:
    Image.new("RGBA", (20, 20), (10, 200, 30, 255)).save(tmp_path / "opaque.png")
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(tmp_path / "red.jpg")  # pure red in CMYK
    opaque = decode_image(tmp_path / "opaque.png", PRE, BIG_LIMIT)
    assert np.abs(opaque.astype(int) - [10, 200, 30]).max() <= 1
    clear = decode_image(tmp_path / "clear.png", PRE, BIG_LIMIT)
    assert clear.min() >= 254  # transparent pixels go on white, not black
    red = decode_image(tmp_path / "red.jpg", PRE, BIG_LIMIT).astype(int)
    assert red[..., 0].mean() > 200 and red[..., 1].mean() < 60 and red[..., 2].mean() < 60


def test_16bit_gradient_keeps_its_range(tmp_path: Path) -> None:
    _gradient16().save(tmp_path / "g.png")
    arr = decode_image(tmp_path / "g.png", PRE, BIG_LIMIT)
    assert arr.shape == (SIZE, SIZE, 3)
    assert len(np.unique(arr)) > 8  # not clipped to all-255 nor flattened to one value
    assert arr.min() < 30 and arr.max() > 225
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()  # grey stays grey
    row = arr[SIZE // 2, :, 0].astype(int)
    assert (np.diff(row) >= 0).all()  # the left-to-right ramp survives


# ------------------------------------------------------------------------ folder structure

def test_nested_folders_inside_a_class_are_included(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", {"a": 1, "b": 1})
    for sub in ("x", "x/y/z"):
        (root / "a" / sub).mkdir(parents=True, exist_ok=True)
        noise(seed=5).save(root / "a" / sub / "n.png")
    classes, images, labels, skipped = read(root)
    assert classes == ["a", "b"]  # nested folders are not classes
    assert labels == [0, 0, 0, 1]
    assert skipped == {}


def test_loose_and_hidden_files_are_skipped(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", {"a": 1, "b": 1})
    (root / "README.txt").write_text("hi")
    (root / "a" / ".DS_Store").write_bytes(b"\0\0")
    classes, images, _, skipped = read(root)
    assert classes == ["a", "b"] and len(images) == 2
    assert skipped == {"README.txt": "file outside any class folder", "a/.DS_Store": "hidden file"}


def test_empty_class_folder_keeps_its_label_with_zero_images(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", {"a": 4, "b": 4})
    (root / "c-empty").mkdir()
    manifest, _ = ingest(tmp_path, root)
    assert manifest["classes"] == ["a", "b", "c-empty"]
    for split in ("train", "val"):
        assert manifest["counts"][split]["c-empty"] == 0
        assert manifest["counts"][split]["a"] > 0 and manifest["counts"][split]["b"] > 0


def test_single_class_is_refused(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", {"only": 6})
    with pytest.raises(ConfigError, match="at least 2"):
        ingest(tmp_path, root)


def test_two_class_folders_but_one_has_no_decodable_image_is_refused(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", {"a": 4})
    (root / "b").mkdir()
    (root / "b" / "x.jpg").write_text("not an image")
    with pytest.raises(ConfigError, match="at least 2") as info:
        ingest(tmp_path, root)
    assert "2 file(s) skipped" in str(info.value)  # the broken file, and b as a class without images


def test_single_class_with_nested_folders_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for sub in ("s1", "s2"):
        make_folder(root / "only", {sub: 3})
    with pytest.raises(ConfigError, match="at least 2"):
        ingest(tmp_path, root)


def test_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_image_folder(tmp_path / "nope", PRE, BIG_LIMIT, [])
    with pytest.raises(ConfigError, match="does not exist"):
        prepare_source(str(tmp_path / "nope"), FileStore(tmp_path / "store"))


# ------------------------------------------------------------------------ non-UTF-8 names

def _bytes_path(folder: Path, name: bytes) -> bytes:
    return os.fsencode(folder) + b"/" + name


def test_non_utf8_file_names(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", {"a": 2, "b": 2})
    with open(_bytes_path(root / "a", b"caf\xe9.png"), "wb") as f:  # latin-1 name, a real image
        noise(seed=3).save(f, "PNG")
    with open(_bytes_path(root / "b", b"bro\xffken.jpg"), "wb") as f:  # broken, so it is skipped
        f.write(b"garbage")
    classes, images, labels, skipped = read(root)
    assert labels == [0, 0, 0, 1, 1]
    [(name, reason)] = skipped.items()
    assert reason == "not an image Pillow can read"
    assert name.isprintable() and name.startswith("b/bro") and name.endswith("ken.jpg")
    name.encode("utf-8")  # storable as UTF-8 (JSON, report.md) without error
    json.dumps(skipped, ensure_ascii=False).encode("utf-8")


def test_non_utf8_names_through_the_ingest_stage(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", {"a": 3, "b": 3})
    with open(_bytes_path(root / "a", b"caf\xe9.png"), "wb") as f:
        noise(seed=4).save(f, "PNG")
    with open(_bytes_path(root / "b", b"bro\xffken.png"), "wb") as f:
        f.write(b"\x89PNG garbage")
    manifest, store = ingest(tmp_path, root)
    assert manifest["sizes"]["train"] + manifest["sizes"]["val"] == 7
    [entry] = manifest["skipped"]
    assert entry["file"].isprintable() and entry["file"].startswith("b/bro")
    stored = store.get_bytes(f"stages/ingest/{_key(manifest)}/manifest.json").decode("utf-8")
    assert entry["file"] in json.loads(stored)["skipped"][0]["file"]


def test_non_utf8_special_file_does_not_crash_folder_to_tar(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", {"a": 1, "b": 1})
    os.mkfifo(_bytes_path(root / "a", b"pipe\xff"))
    folder_to_tar(root, tmp_path / "d.tar")
    with tarfile.open(tmp_path / "d.tar") as tf:
        skipped = json.loads(tf.extractfile(SKIPPED_MEMBER).read())
    assert skipped[0]["reason"] == "not a regular file" and skipped[0]["file"].isprintable()


# --------------------------------------------------------------------------------- archives

PNG = encoded(noise(), "PNG")


@pytest.mark.parametrize(("members", "message"), [
    pytest.param([("a/x.png", "file", PNG), ("../evil", "file", b"evil")], "unsafe member path", id="dotdot"),
    pytest.param([("a/../../evil", "file", b"evil")], "unsafe member path", id="dotdot-inside"),
    pytest.param([("ABS", "file", b"evil")], "unsafe member path", id="absolute"),
    pytest.param([("a/x.png", "file", PNG), ("a/l.png", "symlink", "/etc/passwd")], "link", id="symlink-abs"),
    pytest.param([("a/l.png", "symlink", "../../../etc/passwd")], "link", id="symlink-rel"),
    pytest.param([("a/x.png", "file", PNG), ("a/h.png", "hardlink", "a/x.png")], "link", id="hardlink"),
])
@pytest.mark.parametrize("compression", ["w", "w:gz"], ids=["tar", "tgz"])
def test_unsafe_tar_is_refused_and_writes_nothing_outside(tmp_path: Path, members: list, message: str,
                                                          compression: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    evil_abs = tmp_path / "abs-evil"
    members = [(str(evil_abs) if n == "ABS" else n, k, d) for n, k, d in members]
    archive = tar_of(tmp_path / ("bad.tgz" if compression == "w:gz" else "bad.tar"), members, compression)
    before = files_under(tmp_path)
    dest = work / "a" / "b" / "dest"
    with pytest.raises(ConfigError, match=message):
        safe_extract(archive, dest, 10**9)
    after = files_under(tmp_path)
    new = {p for p in after - before if not p.startswith("work/a")}
    assert new == set()
    assert not evil_abs.exists() and not (work / "a" / "b" / "evil").exists() and not (work / "evil").exists()
    assert files_under(dest) == set()  # checked before anything is written


def test_unsafe_tar_source_is_refused_by_the_ingest_stage(tmp_path: Path) -> None:
    archive = tar_of(tmp_path / "bad.tar", [("a/x.png", "file", PNG), ("b/y.png", "file", PNG),
                                            ("../evil.png", "file", PNG)])
    with pytest.raises(ConfigError, match="unsafe member path"):
        ingest(tmp_path, archive)
    assert not (tmp_path / "evil.png").exists()


def test_zip_bomb_over_max_archive_bytes_is_refused(tmp_path: Path) -> None:
    zeros = b"\0" * (4 << 20)
    archive = zip_of(tmp_path / "bomb.zip", [("a/x.png", zeros), ("b/y.png", zeros)])
    assert archive.stat().st_size < 64 * 1024  # small on disk, 8 MiB expanded
    dest = tmp_path / "dest"
    with pytest.raises(ConfigError, match="max_archive_bytes"):
        safe_extract(archive, dest, 1 << 20)
    assert files_under(dest) == set()


def test_tar_over_max_archive_bytes_is_refused(tmp_path: Path) -> None:
    archive = tar_of(tmp_path / "big.tar.gz", [("a/x", "file", b"\0" * 300_000), ("b/y", "file", b"\0" * 300_000)],
                     "w:gz")
    with pytest.raises(ConfigError, match="max_archive_bytes"):
        safe_extract(archive, tmp_path / "dest", 500_000)
    with pytest.raises(ConfigError, match="max_archive_bytes"):
        ingest(tmp_path, archive, max_archive_bytes=500_000)


@pytest.mark.parametrize(("members", "symlink", "message"), [
    pytest.param([("../evil", b"x")], None, "unsafe member path", id="zip-dotdot"),
    pytest.param([("a/x.png", PNG)], ("a/l.png", "/etc/passwd"), "symlink", id="zip-symlink"),
])
def test_unsafe_zip_is_refused(tmp_path: Path, members, symlink, message: str) -> None:
    archive = zip_of(tmp_path / "bad.zip", members, symlink)
    dest = tmp_path / "x" / "dest"
    with pytest.raises(ConfigError, match=message):
        safe_extract(archive, dest, 10**9)
    assert not (tmp_path / "x" / "evil").exists() and files_under(dest) == set()


def test_safe_archives_extract_to_the_dataset_root(tmp_path: Path) -> None:
    tar = tar_of(tmp_path / "ok.tar", [("top/a/x.png", "file", PNG), ("top/b/y.png", "file", PNG)])
    root = safe_extract(tar, tmp_path / "t", 10**6)
    assert root == tmp_path / "t" / "top"
    assert (root / "a" / "x.png").read_bytes() == PNG
    zp = zip_of(tmp_path / "ok.zip", [("a/x.png", PNG), ("b/y.png", PNG)])
    root = safe_extract(zp, tmp_path / "z", 10**6)
    assert root == tmp_path / "z" and (root / "b" / "y.png").read_bytes() == PNG


def test_not_an_archive_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.tar"
    bogus.write_bytes(b"definitely not a tar file" * 40)
    with pytest.raises(ConfigError, match="not a readable tar or zip"):
        safe_extract(bogus, tmp_path / "dest", 10**9)


# -------------------------------------------------------------- folder -> tar -> store -> worker

def test_symlinks_through_folder_tar_and_materialize(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", {"a": 2, "b": 2})
    outside = tmp_path / "secret.png"
    noise(seed=9).save(outside)
    os.symlink(outside, root / "a" / "out.png")
    os.symlink(root / "b" / "000.png", root / "a" / "in.png")  # inside the dataset: stored as a file
    os.symlink(tmp_path, root / "b" / "outdir")
    store = FileStore(tmp_path / "store")
    desc = prepare_source(str(root), store)
    assert desc["kind"] == "archive" and store.exists(store.key_of(desc["uri"]))
    with tarfile.open(store.root / store.key_of(desc["uri"])) as tf:
        assert not any(m.issym() or m.islnk() for m in tf.getmembers())
    ds_root, skipped = materialize_source(desc, store, tmp_path / "work", 10**9)
    assert {s["file"]: s["reason"] for s in skipped} == {"a/out.png": "symlink points outside the dataset",
                                                        "b/outdir": "symlink points outside the dataset"}
    assert not (ds_root / "a" / "out.png").exists()
    assert (ds_root / "a" / "in.png").is_file() and not (ds_root / "a" / "in.png").is_symlink()
    assert not (ds_root / SKIPPED_MEMBER).exists()
    classes, images, _, more = read(ds_root)
    assert classes == ["a", "b"] and len(images) == 5 and more == {}
    manifest, _ = ingest(tmp_path, root)
    assert {"file": "a/out.png", "reason": "symlink points outside the dataset"} in manifest["skipped"]


def test_folder_tar_is_reproducible(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", {"a": 2, "b": 2})
    store = FileStore(tmp_path / "store")
    first = prepare_source(str(root), store)
    os.utime(root / "a" / "000.png", (1, 1))  # times and owners do not enter the digest
    assert prepare_source(str(root), store)["sha256"] == first["sha256"]
    assert prepare_source(f"file://{root}", store)["sha256"] == first["sha256"]
    (root / "a" / "000.png").write_bytes(encoded(noise(seed=77), "PNG"))
    assert prepare_source(str(root), store)["sha256"] != first["sha256"]


def test_materialize_verifies_the_digest(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", {"a": 1, "b": 1})
    store = FileStore(tmp_path / "store")
    desc = prepare_source(str(root), store)
    (store.root / store.key_of(desc["uri"])).write_bytes(b"tampered")
    with pytest.raises(Exception, match="sha256"):
        materialize_source(desc, store, tmp_path / "work", 10**9)


# ---------------------------------------------------------------------------------- splitting

def test_stratified_split_properties() -> None:
    sizes = {0: 10, 1: 5, 2: 2, 3: 37}
    labels = [y for y, n in sizes.items() for _ in range(n)]
    rng = np.random.default_rng(1)
    rng.shuffle(labels)
    labels = [int(y) for y in labels]
    train, val = stratified_split(labels, 0.2, seed=3)
    assert sorted(train + val) == list(range(len(labels)))  # a partition
    assert not set(train) & set(val)
    for y, n in sizes.items():
        n_val = sum(1 for i in val if labels[i] == y)
        n_train = sum(1 for i in train if labels[i] == y)
        assert n_val >= 1 and n_train >= 1, y  # every class in both splits
        assert n_val == min(max(round(n * 0.2), 1), n - 1)
        assert n_train + n_val == n
    assert stratified_split(labels, 0.2, seed=3) == (train, val)  # seeded
    assert stratified_split(labels, 0.2, seed=4) != (train, val)
    # a class with one image stays in train
    train1, val1 = stratified_split([0, 0, 0, 1], 0.5, seed=0)
    assert 3 in train1 and 3 not in val1


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.99])
def test_stratified_split_extremes_keep_both_splits(fraction: float) -> None:
    labels = [0] * 7 + [1] * 3
    train, val = stratified_split(labels, fraction, seed=0)
    for y in (0, 1):
        assert any(labels[i] == y for i in train) and any(labels[i] == y for i in val)


# ---------------------------------------------------------------------------- ingest manifest

def test_ingest_manifest(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", {"cat": 10, "dog": 6, "eel": 3})
    (root / "dog" / "broken.jpg").write_bytes(_truncated("JPEG"))
    (root / "eel" / "empty.png").write_bytes(b"")
    Image.new("L", (300, 300), 5).save(root / "cat" / "huge.png")  # 90,000 px > the limit below
    manifest, store = ingest(tmp_path, root, val_fraction=0.25, calib_size=8, max_image_pixels=20_000)
    assert manifest["stage"] == "ingest"
    assert manifest["classes"] == ["cat", "dog", "eel"]
    counts = manifest["counts"]
    assert counts["val"] == {"cat": 2, "dog": 2, "eel": 1}  # round(n * 0.25), at least 1
    assert counts["train"] == {"cat": 8, "dog": 4, "eel": 2}
    assert sum(counts["calib"].values()) == 8
    assert all(counts["calib"][c] <= counts["train"][c] for c in manifest["classes"])
    assert manifest["sizes"] == {"train": 14, "val": 5, "calib": 8}
    reasons = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"dog/broken.jpg", "eel/empty.png", "cat/huge.png"}
    assert "broken image" in reasons["dog/broken.jpg"]
    assert "empty file" in reasons["eel/empty.png"]
    assert "bomb" in reasons["cat/huge.png"] or "max_image_pixels" in reasons["cat/huge.png"]
    assert manifest["preprocess"]["crop"] == SIZE
    for split in ("train", "val", "calib"):
        refs = manifest["outputs"][split]
        assert refs, split
        xs, ys = [], []
        for i, ref in enumerate(refs):
            shard = torch.load(store.fetch(ref, tmp_path / f"{split}-{i}.pt"), weights_only=True)
            xs.append(shard["images"])
            ys.append(shard["labels"])
        x, y = torch.cat(xs), torch.cat(ys)
        assert x.dtype == torch.uint8 and x.shape == (manifest["sizes"][split], 3, SIZE, SIZE)
        assert y.dtype == torch.int64
        per_class = {c: int((y == i).sum()) for i, c in enumerate(manifest["classes"])}
        assert per_class == counts[split]
    # the same source and config give the same key: the second ingest is the cached manifest
    again, _ = ingest(tmp_path, root, val_fraction=0.25, calib_size=8, max_image_pixels=20_000)
    assert again["key"] == manifest["key"] and again["created"] == manifest["created"]


def test_ingest_split_is_seeded(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", {"a": 6, "b": 6})
    m1, s1 = ingest(tmp_path / "one", root)
    m2, s2 = ingest(tmp_path / "two", root)
    v1 = torch.load(s1.fetch(m1["outputs"]["val"][0], tmp_path / "v1.pt"), weights_only=True)
    v2 = torch.load(s2.fetch(m2["outputs"]["val"][0], tmp_path / "v2.pt"), weights_only=True)
    assert torch.equal(v1["images"], v2["images"]) and torch.equal(v1["labels"], v2["labels"])


def _key(manifest: dict) -> str:
    return manifest["key"]
