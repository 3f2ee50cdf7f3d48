"""Dataset ingestion: read a source, decode and validate every image, split, and write shards.

Sources: ``builtin:digits`` (scikit-learn's handwritten digits), an ImageFolder directory (one
sub-folder per class, nested folders allowed), or a .tar/.tar.gz/.tgz/.zip archive holding one.
Broken, non-image, oversized or unsafe files are skipped and counted with the reason; they never
stop the ingest. A dataset with fewer than two classes or an empty split is refused.

Images are stored after the eval transform's geometric part (RGB, Resize, CenterCrop) as uint8
tensors in shards of at most ``SHARD_SIZE`` images; ToTensor and Normalize happen when batches
are drawn (``pipeline.train.normalize``).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

from pipeline.archives import (  # noqa: F401  (re-exported: the archive helpers lived here)
    ARCHIVE_SUFFIXES,
    MAX_ARCHIVE_MEMBERS,
    TAR_DAMAGE,
    dataset_root,
    is_archive,
    printable_name,
    safe_extract,
)
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

SHARD_SIZE = 2048
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)



@dataclass
class Preprocess:
    """The eval transform: RGB -> Resize(resize) -> CenterCrop(crop) -> ToTensor -> Normalize."""

    resize: int
    crop: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation}


@dataclass
class Split:
    images: list[np.ndarray] = field(default_factory=list)  # HxWx3 uint8 each
    labels: list[int] = field(default_factory=list)


@dataclass
class Dataset:
    classes: list[str]
    train: Split
    val: Split
    skipped: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------------- decoding

def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (16-bit and float images are rescaled, not clipped)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
        img = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, resize: int, crop: int) -> Image.Image:
    """torchvision's Resize(int) (shorter side) then CenterCrop, with bilinear interpolation."""
    w, h = img.size
    if w <= h:
        nw, nh = resize, max(1, int(resize * h / w))
    else:
        nw, nh = max(1, int(resize * w / h)), resize
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left = int(round((nw - crop) / 2.0))
    top = int(round((nh - crop) / 2.0))
    return img.crop((left, top, left + crop, top + crop))


def decode_image(path: Path, pre: Preprocess, max_pixels: int) -> np.ndarray:
    """Decode one image file fully and apply the geometric transform. Raises ValueError with
    a reason a person can act on."""
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # the size check below happens before any pixel is decoded
        try:
            with Image.open(path) as img:
                pixels = img.width * img.height
                if pixels > 2 * max_pixels:
                    raise ValueError(f"refused as a decompression bomb: {img.width}x{img.height} claims {pixels} "
                                     f"pixels, far over data.max_image_pixels={max_pixels}")
                if pixels > max_pixels:
                    raise ValueError(f"image is {img.width}x{img.height} ({pixels} pixels), over "
                                     f"data.max_image_pixels={max_pixels}: raise the limit to accept it")
                img.load()
                rgb = _to_rgb(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ValueError(f"refused as a decompression bomb: {err}") from None
        except Image.UnidentifiedImageError:
            raise ValueError("not an image Pillow can read") from None
        except (OSError, SyntaxError, EOFError) as err:
            raise ValueError(f"broken image: {err}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = old
    return np.asarray(resize_center_crop(rgb, pre.resize, pre.crop), dtype=np.uint8)


# ------------------------------------------------------------------------------- image folders

def _walk_class(root: Path, class_dir: Path) -> Iterator[tuple[Path, str | None]]:
    """Files of one class, nested folders included, sorted; yields (path, skip_reason)."""
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=False):
        dirnames.sort()
        for d in list(dirnames):
            p = Path(dirpath) / d
            if p.is_symlink():
                dirnames.remove(d)
                yield p, "symlinked folder is not followed"
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if name.startswith("."):
                yield p, "hidden file"
                continue
            if p.is_symlink():
                target = p.resolve()
                if not target.is_relative_to(real_root):
                    yield p, "symlink points outside the dataset"
                    continue
            yield p, None


def read_image_folder(root: Path, pre: Preprocess, max_pixels: int, skipped: list[dict],
                      classes: list[str] | None = None,
                      progress: Callable[[int], None] | None = None) -> tuple[list[str], Split]:
    if not root.is_dir():
        raise ConfigError(f"dataset folder {root} does not exist or is not a folder")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    # class names travel in manifests and JSON: make undecodable bytes visible, keep the real path
    folders = {printable_name(name): name for name in found}
    found = sorted(folders)
    for p in sorted(root.iterdir()):
        if p.is_file():
            skipped.append({"file": _display(p, root), "reason": "file outside any class folder"})
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ConfigError(f"validation source has classes {unknown} that the training source "
                              f"lacks (training classes: {classes})")
    split = Split()
    for label, name in enumerate(classes):
        cdir = root / folders.get(name, name)
        if not cdir.is_dir():
            continue
        before = len(split.labels)
        for path, reason in _walk_class(root, cdir):
            if reason is None:
                try:
                    split.images.append(decode_image(path, pre, max_pixels))
                    split.labels.append(label)
                    if progress:
                        progress(1)
                    continue
                except ValueError as err:
                    reason = str(err)
                except OSError as err:
                    reason = f"unreadable: {err.strerror or err}"
            skipped.append({"file": _display(path, root), "reason": reason})
            log.warning("skipped %s: %s", _display(path, root), reason)
        if len(split.labels) == before:
            skipped.append({"file": name, "reason": "class folder holds no images: its class gets no "
                                                          "training data (add images or remove the folder)"})
    return classes, split


def _display(path: Path, root: Path) -> str:
    return printable_name(os.path.relpath(path, root))


def load_digits(pre: Preprocess) -> tuple[list[str], Split]:
    """scikit-learn's 1,797 8x8 handwritten digits as RGB images of the crop size."""
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    split = Split()
    for img, label in zip(digits.images, digits.target, strict=True):
        gray = Image.fromarray((img * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
        split.images.append(np.asarray(resize_center_crop(gray.convert("RGB"), pre.resize, pre.crop)))
        split.labels.append(int(label))
    return [str(i) for i in range(10)], split


# ----------------------------------------------------------------------------------- splitting

def stratified_split(labels: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded, stratified split: each class keeps round(n * val_fraction) images for val (at
    least one when it has two or more)."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    train, val = [], []
    for y in sorted(by_class):
        idx = np.array(by_class[y])
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        else:
            n_val = 0
        val.extend(idx[:n_val].tolist())
        train.extend(idx[n_val:].tolist())
    return sorted(train), sorted(val)


def subset(split: Split, idx: list[int]) -> Split:
    return Split([split.images[i] for i in idx], [split.labels[i] for i in idx])


def calibration_indices(n: int, size: int, seed: int) -> list[int]:
    """A seeded draw of ``size`` of ``n`` training images; all of them when ``size`` > ``n``
    (see ``calibration_note``)."""
    rng = np.random.default_rng(seed + 1)
    return sorted(rng.choice(n, size=min(size, n), replace=False).tolist())


def calibration_note(calib_size: int, train_size: int) -> str | None:
    """The note a run carries when data.calib_size asks for more images than the training split
    holds. Calibration then uses every training image rather than failing: the default (256)
    must work on small datasets, and calibrating on all there is is what the setting asks for."""
    if calib_size <= train_size:
        return None
    return (f"data.calib_size={calib_size} is more than the {train_size} training images: calibrated on all "
            f"{train_size}; set data.calib_size to {train_size} or less, or add images")


def to_tensors(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NCHW images and int64 labels."""
    if not split.images:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    x = torch.from_numpy(np.stack(split.images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(split.labels, dtype=torch.int64)


def write_shards(split: Split, out_dir: Path, name: str) -> list[Path]:
    """Write a split as ``{name}-NNNNN.pt`` files of at most SHARD_SIZE images (plain tensors,
    loadable with ``torch.load(weights_only=True)``)."""
    x, y = to_tensors(split)
    paths = []
    for n, start in enumerate(range(0, len(y), SHARD_SIZE)):
        path = out_dir / f"{name}-{n:05d}.pt"
        torch.save({"images": x[start:start + SHARD_SIZE].clone(),
                    "labels": y[start:start + SHARD_SIZE].clone()}, path)
        paths.append(path)
    return paths


def read_shards(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for p in paths:
        d = torch.load(p, weights_only=True)
        xs.append(d["images"])
        ys.append(d["labels"])
    return torch.cat(xs), torch.cat(ys)


def counts(split: Split, classes: list[str]) -> dict[str, int]:
    c = {name: 0 for name in classes}
    for y in split.labels:
        c[classes[y]] += 1
    return c


def check_dataset(ds: Dataset) -> None:
    """Refuse what no model can be trained or evaluated on, saying why."""
    present = sorted({ds.classes[y] for y in ds.train.labels} | {ds.classes[y] for y in ds.val.labels})
    if len(ds.classes) < 2 or len(present) < 2:
        raise ConfigError(
            f"the dataset has {len(present)} class(es) with images ({present}); at least 2 are "
            f"needed: add one sub-folder of images per class ({len(ds.skipped)} file(s) skipped)")
    if not ds.train.labels:
        raise ConfigError("the training split is empty: add images or lower data.val_fraction")
    if not ds.val.labels:
        raise ConfigError("the validation split is empty: add images, raise data.val_fraction "
                          "or give data.val_source")
    empty = [c for c, n in counts(ds.train, ds.classes).items() if n == 0]
    if empty:
        log.warning("classes without training images: %s", empty)
