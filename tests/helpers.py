"""Helpers that test modules share: small specs, plans by node id, polling, one intra-op torch
thread, image, ImageFolder and archive builders, and the fine-tuned ResNet18 that the
calibration and sensitivity tests measure.

Fixtures live in ``tests/conftest.py``; this module holds the plain functions, classes and specs
a test module imports. The fine-tuned model is built by ``finetune_once`` into a
content-addressed store that every pytest-xdist worker of a run shares (the ``finetuned``
fixture), so the finetune stage trains once per test run and every later use is its cache hit.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import os
import tarfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from PIL import Image

from pipeline.data import read_shards
from pipeline.models import build_model, load_state_dict
from pipeline.plan import CALIBRATION_STATISTIC, build_plan
from pipeline.quant import convert_static, correct_bias, observer_state, prepare_static
from pipeline.sources import prepare_sources
from pipeline.spec import PipelineSpec, parse_spec
from pipeline.stages import execute
from pipeline.store import FileStore
from pipeline.train import normalize

SMALL_SPEC = {
    "name": "digits-small",
    "seed": 0,
    "data": {"source": "builtin:digits", "image_size": 32, "calib_size": 64},
    "model": {"arch": "resnet18"},
    # Two epochs at batch 32 (90 steps) train to 0.89-0.94 val top-1 for seeds 0-3 on this data, far
    # from the tests' 0.5 floor on any CPU; one epoch at batch 64 ended anywhere from 0.15 to 0.66
    # with the seed alone, and at 0.36 on an AMD EPYC where oneDNN picks other kernels than here.
    "finetune": {"epochs": 2, "batch_size": 32, "lr": 0.01},
    "quantize": {"backend": "x86", "variants": [
        {"name": "ptq-minmax", "method": "static", "observer": "minmax"},
        {"name": "ptq-histogram", "method": "static", "observer": "histogram"},
        {"name": "dynamic", "method": "dynamic"},
        {"name": "qat", "method": "qat", "epochs": 1, "lr": 0.001},
    ]},
    # TorchScript only: the ONNX Runtime and OpenVINO forms are measured by test_sensitivity and test_scale
    "benchmark": {"batch_sizes": [1, 8], "threads": 1, "warmup": 1, "iterations": 5, "accuracy_budget": 0.05,
                  "runtimes": ["torchscript"]},
}


def plan_of(spec: dict | PipelineSpec, store: FileStore) -> list[dict]:
    """The plan of ``spec`` (a dict or a parsed spec); its sources are uploaded to ``store``."""
    spec = parse_spec(spec)
    return build_plan(spec, prepare_sources(spec, store))


def nodes_of(spec: dict | PipelineSpec, store: FileStore) -> dict[str, dict]:
    """The plan of ``spec`` by node id."""
    return {n["id"]: n for n in plan_of(spec, store)}


def wait_for(pred, timeout: float = 180, every: float = 0.2):
    """Poll ``pred`` until it returns something true (returned), or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"condition not met within {timeout}s")


def worker_logs(cluster: dict) -> str:
    return "\n".join(Path(w.log_path).read_text(errors="replace")[-6000:] for w in cluster["workers"])


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread while inside: tiny models gain nothing from more, one thread keeps
    every float reduction in one order (so a model trains to the same weights wherever it is
    trained), and on a busy 2-core machine OpenMP threads spinning against other processes made
    the stage tests ~5x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------ images and archives

def noise(w: int = 20, h: int = 20, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def encoded(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def make_folder(root: Path, layout: dict[str, int], seed: int = 0) -> Path:
    """An ImageFolder with ``layout[class]`` random PNGs per class."""
    for c, n in layout.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            noise(seed=seed * 1000 + sum(map(ord, c)) * 50 + i).save(root / c / f"{i:03d}.png")
    return root


def tar_of(path: Path, members: list[tuple[str, str, bytes | str]], mode: str = "w") -> Path:
    """A tar archive of (name, kind, data) members: kind file (data: bytes), dir, symlink or
    hardlink (data: the link's target)."""
    with tarfile.open(path, mode) as tf:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                assert isinstance(data, bytes)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                info.linkname = str(data)
                tf.addfile(info)
    return path


def zip_of(path: Path, members: list[tuple[str, bytes]], symlink: tuple[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
        if symlink:  # (name, target): a member whose mode says symlink, as `zip --symlinks` stores one
            info = zipfile.ZipInfo(symlink[0])
            info.external_attr = 0o120777 << 16
            zf.writestr(info, symlink[1])
    return path


# ------------------------------------------------------------------ the fine-tuned model

SIZE = 32
ARCH = "resnet18"
EXAMPLE = (torch.zeros(1, 3, SIZE, SIZE),)
TRAINED_SPEC = {
    "name": "calibration-test",
    "seed": 0,
    "data": {"source": "builtin:digits", "image_size": SIZE, "calib_size": 256},
    "model": {"arch": ARCH},
    "finetune": {"epochs": 2, "batch_size": 64, "lr": 0.01},
    "quantize": {"variants": [
        {"name": "ptq-minmax", "method": "static", "observer": "minmax"},
        {"name": "ptq-p999-bc", "method": "static", "observer": "percentile", "percentile": 99.9,
         "bias_correction": True},
        {"name": "ptq-mse", "method": "static", "observer": "mse", "per_channel": False},
        {"name": "ptq-entropy", "method": "static", "observer": "entropy"},
        {"name": "dynamic", "method": "dynamic"},
    ]},
}
# the outlier-channel model: one channel of this block's first BN (+ReLU) is scaled up by
# OUTLIER_SCALE and the next convolution's weights for it scaled down by as much. The fp32
# function is unchanged (ReLU commutes with positive scaling, and a power of two is exact), but
# that activation now has one channel far above the others, as training without weight decay can
# leave a network: a range set by its maximum (minmax) crushes every other channel. 512: the
# symmetric scheme's 8 bits of activation take twice the outlier torch's 7-bit default took.
OUTLIER_BLOCK = "layer3.1"
OUTLIER_SCALE = 512.0
BUILDS = "builds.jsonl"  # one line per finetune_once call: which worker, and whether it trained


@dataclass(frozen=True)
class Finetuned:
    """TRAINED_SPEC's ingest and finetune results in a shared content-addressed store."""

    folder: Path
    store: FileStore
    plan: dict[str, dict]  # TRAINED_SPEC's plan by node id
    data: dict  # the ingest manifest
    manifest: dict  # the finetune manifest
    cached: bool  # this call found the finetune stage's stored result (the stage's cache hit)

    def builds(self) -> list[dict]:
        """Every finetune_once call on this folder so far, in order."""
        return [json.loads(line) for line in (self.folder / BUILDS).read_text().splitlines()]


def finetune_once(folder: Path) -> Finetuned:
    """Run TRAINED_SPEC's ingest and finetune stages (``execute``, as a worker does) into the
    FileStore under ``folder``, holding a file lock on it.

    The store alone would not make training happen once: two pytest-xdist workers that miss the
    cache at the same moment would both train (the manifest is written last). Under the lock the
    first caller trains and every later one, in any process, finds the stored manifest. filelock
    rather than ``fcntl.flock``: the same lock on every platform, with a timeout if ever needed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(folder / "finetune.lock"), one_torch_thread():
        store = FileStore(folder / "store")
        plan = nodes_of(TRAINED_SPEC, store)
        data = execute(plan["ingest"], store).manifest
        tuned = execute(plan["finetune"], store)
        with (folder / BUILDS).open("a") as log:
            log.write(json.dumps({"worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), "pid": os.getpid(),
                                  "cached": tuned.cached}) + "\n")
    return Finetuned(folder, store, plan, data, tuned.manifest, tuned.cached)


def calibrate(model: torch.nn.Module, statistic: str, images: torch.Tensor) -> dict[str, torch.Tensor]:
    observed = prepare_static(model, EXAMPLE, observer=statistic, per_channel=True, backend="x86", arch=ARCH)
    with torch.no_grad():
        for x in torch.split(images, 32):
            observed(x)
    return observer_state(observed)


def convert(model: torch.nn.Module, stats: dict, observer: str, *, per_channel: bool = True,
            percentile: float | None = None, activations: str = "symmetric") -> torch.nn.Module:
    return convert_static(model, EXAMPLE, stats, observer=observer, per_channel=per_channel, backend="x86",
                          arch=ARCH, percentile=percentile, activations=activations)


class Trained:
    """The fine-tuned model, its data and its store, with memoized calibrations. The store is
    the shared one (``finetuned``); ``folder`` is the caller's own, for fetched copies."""

    def __init__(self, finetuned: Finetuned, folder: Path) -> None:
        self.folder = folder
        self.store = finetuned.store
        self.plan = finetuned.plan
        self.data = finetuned.data
        self.finetune = finetuned.manifest
        self.model = build_model(ARCH, len(self.data["classes"]))
        self.model.load_state_dict(load_state_dict(self.store.fetch(self.finetune["outputs"]["state_dict"],
                                                                    folder / "fp32.pt")))
        self.model.eval()
        pre = self.data["preprocess"]
        self.norm = {"mean": pre["mean"], "std": pre["std"]}
        x_val, self.y_val = self.split("val")
        self.x_val = normalize(x_val, **self.norm)
        self.calib = normalize(self.split("calib")[0], **self.norm)
        self._stats: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        self._int8: dict[tuple, torch.nn.Module] = {}
        self._fp32: dict[int, torch.Tensor] = {}

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        refs = self.data["outputs"][name]
        return read_shards([self.store.fetch(r, self.folder / f"{name}-{i}.pt") for i, r in enumerate(refs)])

    def statistics(self, model: torch.nn.Module, tag: str, statistic: str) -> dict[str, torch.Tensor]:
        if (tag, statistic) not in self._stats:
            self._stats[(tag, statistic)] = calibrate(model, statistic, self.calib)
        return self._stats[(tag, statistic)]

    @functools.cached_property
    def corrected(self) -> tuple[torch.nn.Module, dict]:
        """The percentile-99.9 int8 model with bias correction (the ptq-p999-bc variant), and the
        correction's report."""
        qmodel = copy.deepcopy(self.converted(self.model, "trained", "percentile", percentile=99.9))
        return qmodel, correct_bias(qmodel, self.model, self.calib)

    @property
    def corrected_model(self) -> torch.nn.Module:
        return self.corrected[0]

    @property
    def corrected_report(self) -> dict:
        return self.corrected[1]

    def fp32_outputs(self, model: torch.nn.Module) -> torch.Tensor:
        if id(model) not in self._fp32:
            with torch.no_grad():
                self._fp32[id(model)] = model(self.x_val)
        return self._fp32[id(model)]

    def converted(self, model: torch.nn.Module, tag: str, observer: str, *, per_channel: bool = True,
                  percentile: float | None = None, activations: str = "symmetric") -> torch.nn.Module:
        """The int8 model for one choice, converted once per module (callers must not modify it)."""
        key = (tag, observer, per_channel, percentile, activations)
        if key not in self._int8:
            stats = self.statistics(model, tag, CALIBRATION_STATISTIC[observer])
            self._int8[key] = convert(model, stats, observer, per_channel=per_channel, percentile=percentile,
                                      activations=activations)
        return self._int8[key]


def with_outlier(model: torch.nn.Module, calib: torch.Tensor, x_val: torch.Tensor) -> torch.nn.Module:
    """A copy of ``model`` with an outlier channel after OUTLIER_BLOCK's first convolution: the
    one active least often on the calibration images (but active), scaled up by OUTLIER_SCALE."""
    model = copy.deepcopy(model)
    block = model.get_submodule(OUTLIER_BLOCK)
    seen: list[torch.Tensor] = []
    hook = block.bn1.register_forward_hook(lambda mod, args, out: seen.append(out.relu()))
    with torch.no_grad():
        reference = model(x_val)
        model(calib)
    hook.remove()
    active = (seen[0] > 0).float().mean((0, 2, 3))
    channel = int(torch.where(active > 0, active, torch.full_like(active, 2.0)).argmin())
    with torch.no_grad():
        block.bn1.weight[channel] *= OUTLIER_SCALE
        block.bn1.bias[channel] *= OUTLIER_SCALE
        block.conv2.weight[:, channel] /= OUTLIER_SCALE
        assert torch.allclose(model(x_val), reference, atol=1e-4)
        out = []
        hook = block.bn1.register_forward_hook(lambda mod, args, o: out.append(o.relu()))
        model(calib)
        hook.remove()
    others = torch.cat([out[0][:, :channel], out[0][:, channel + 1:]], 1)
    assert out[0][:, channel].max() > 20 * others.max()  # really an outlier
    return model
