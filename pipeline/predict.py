"""Running a pulled model (``pipeline.registry.pull``) on a user's own images.

The images go through the ingest's decoder and eval transform (``pipeline.data.decode_image``
with the manifest's ``preprocess``) and the model through the runner that measured it: the form
serving the first benchmarked batch size (the one the selection read), loaded the way the
benchmark loaded it. Bad input follows the ingest's rules: a broken, non-image, oversized or
hidden file is skipped and named with the reason, and the rest is predicted.

An argument may be an image file, a folder of images, or an ImageFolder (a folder whose
sub-folders are named after the model's classes): the images of an ImageFolder carry their
folder's class as a label, and the result gives the top-1 accuracy over them. A folder with
sub-folders that are not classes of the model is refused, naming them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data import Preprocess, _walk_class, decode_image, printable_name
from pipeline.errors import ConfigError
from pipeline.registry import check_folder
from pipeline.spec import DataSpec
from pipeline.train import normalize

log = logging.getLogger(__name__)

BATCH = 16  # images per forward pass: only memory depends on it
MAX_PIXELS = DataSpec.model_fields["max_image_pixels"].default  # the ingest's default limit


@dataclass(frozen=True)
class Found:
    path: Path
    shown: str  # the name printed for it
    label: str | None = None  # its ImageFolder class


def images_of(args: list[str | Path], classes: list[str]) -> tuple[list[Found], list[dict]]:
    """The images named by ``args`` (files, folders, ImageFolders; see the module docstring), and
    the files skipped before decoding (``{"file", "reason"}``)."""
    found: list[Found] = []
    skipped: list[dict] = []
    for arg in args:
        root = Path(arg)
        if root.is_file():
            found.append(Found(root, printable_name(str(arg))))
            continue
        if not root.is_dir():
            skipped.append({"file": printable_name(str(arg)), "reason": "no such file or folder"})
            continue
        subfolders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if subfolders:
            unknown = [printable_name(n) for n in subfolders if printable_name(n) not in classes]
            if unknown:
                raise ConfigError(f"{arg} has sub-folders {unknown} that are not classes of this model (its classes: "
                                  f"{classes}): give an ImageFolder whose sub-folders are among them, or the images "
                                  "themselves")
            for p in sorted(root.iterdir()):
                if p.is_file():
                    skipped.append({"file": printable_name(str(p)), "reason": "file outside any class folder"})
        folders = [(root / n, printable_name(n)) for n in subfolders] or [(root, None)]
        # the ingest's walk: nested folders, sorted; hidden files and links leading outside skipped
        for folder, label in folders:
            for path, reason in _walk_class(root, folder):
                if reason:
                    skipped.append({"file": printable_name(str(path)), "reason": reason})
                elif path.is_file():
                    found.append(Found(path, printable_name(str(path)), label))
    return found, skipped


def _runner(folder: Path, manifest: dict) -> tuple[Any, str, str]:
    """The runner of the form serving the first batch size, its runtime and its file."""
    from pipeline.quant import load_torchscript, set_engine
    from pipeline.runtimes import OvRunner, load_runner

    serving = manifest["serving"]
    first = serving[next(iter(serving))]
    runtime, path = first["runtime"], folder / first["file"]
    threads = torch.get_num_threads()
    if runtime == "torchscript":
        if manifest.get("backend"):
            set_engine(manifest["backend"])
        return load_torchscript(path), runtime, first["file"]
    if runtime == "openvino" and manifest.get("engine"):  # another engine's file, read as the benchmark read it
        import openvino as ov

        return OvRunner(ov.Core().read_model(str(path)), threads), runtime, first["file"]
    return load_runner(runtime, path, threads=threads, batch_size=None), runtime, first["file"]


def predict(folder: str | Path, args: list[str | Path], *, top_k: int = 5) -> dict[str, Any]:
    """Predict the images named by ``args`` with the model pulled into ``folder``. Returns
    ``{"model", "variant", "runtime", "file", "predictions": [{"image", "top": [{"class",
    "probability"}], "label"?, "correct"?}], "skipped": [{"file", "reason"}], "top1": {"accuracy",
    "correct", "images"} or None}``. Raises ConfigError when no image could be read."""
    if top_k < 1:
        raise ConfigError(f"--top-k must be 1 or more, not {top_k}")
    folder = Path(folder)
    manifest = check_folder(folder)  # every file against its sha256, before anything is loaded
    classes = [str(c) for c in manifest["classes"]]
    found, skipped = images_of(args, classes)
    p = manifest["preprocess"]
    pre = Preprocess(resize=p["resize"], crop=p["crop"], mean=tuple(p["mean"]), std=tuple(p["std"]))
    decoded: list[tuple[Found, np.ndarray]] = []
    for img in found:
        try:
            decoded.append((img, decode_image(img.path, pre, MAX_PIXELS)))
        except ValueError as err:
            skipped.append({"file": img.shown, "reason": str(err)})
        except OSError as err:
            skipped.append({"file": img.shown, "reason": f"unreadable: {err.strerror or err}"})
    for s in skipped:
        log.info("skipped %s: %s", s["file"], s["reason"])
    if not decoded:
        raise ConfigError(f"no image to predict: {len(skipped)} skipped"
                          + "".join(f"\n  {s['file']}: {s['reason']}" for s in skipped[:20]))
    runner, runtime, file = _runner(folder, manifest)
    k = min(top_k, len(classes))
    predictions = []
    with torch.no_grad():
        for start in range(0, len(decoded), BATCH):
            chunk = decoded[start:start + BATCH]
            x = torch.from_numpy(np.stack([a for _, a in chunk])).permute(0, 3, 1, 2).contiguous()
            probs = runner(normalize(x, mean=pre.mean, std=pre.std)).float().softmax(1)
            values, indices = probs.topk(k, dim=1)
            for (img, _), vs, ix in zip(chunk, values.tolist(), indices.tolist(), strict=True):
                top = [{"class": classes[i], "probability": round(v, 6)} for v, i in zip(vs, ix, strict=True)]
                row: dict[str, Any] = {"image": img.shown, "top": top}
                if img.label is not None:
                    row |= {"label": img.label, "correct": classes[ix[0]] == img.label}
                predictions.append(row)
    labelled = [r for r in predictions if "label" in r]
    correct = sum(r["correct"] for r in labelled)
    return {"model": str(folder), "run_id": manifest.get("run_id"), "variant": manifest.get("variant"),
            "runtime": runtime, "file": file, "predictions": predictions, "skipped": skipped,
            "warnings": manifest.get("warnings") or [],
            "top1": {"accuracy": correct / len(labelled), "correct": correct, "images": len(labelled)}
            if labelled else None}
