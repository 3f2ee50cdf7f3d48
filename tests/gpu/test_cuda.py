"""The CUDA path itself, on a machine with an NVIDIA GPU (marked ``gpu``: skipped, with the
probe's reason, anywhere else). The CPU-side proofs are in tests/test_gpu_workers.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_gpu_workers import MEAN, STD, Ctx, tiny_data, tiny_model

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_on_cuda_resumes_like_an_uninterrupted_run(tmp_path: Path, precision: str) -> None:
    """Train two epochs on the GPU, and separately one epoch then a resume from its checkpoint
    (loaded to the CPU first, its CPU and CUDA RNG states restored): the resumed run trains the
    second epoch on CUDA, in the precision asked for, with channels_last, and ends with finite
    losses and the same epochs. (Equal numbers are not asserted: CUDA kernels are not bit-exact.)"""
    from pipeline.store import FileStore
    from pipeline.train import load_checkpoint, train_epochs, training_precision

    device = torch.device("cuda")
    x, y = tiny_data()
    used, note = training_precision(precision, device)
    kwargs = dict(batch_size=32, lr=0.05, momentum=0.9, weight_decay=0.0, mean=MEAN, std=STD, device=device,
                  seed=0, precision=used, channels_last=True)
    ctx = Ctx(FileStore(tmp_path / "store"), tmp_path)
    train_epochs(tiny_model(), ctx, x, y, x, y, epochs=1, **kwargs)
    state = load_checkpoint(ctx)
    assert state["cuda_rng"] and all(t.device.type == "cpu" for t in state["cuda_rng"])
    assert ("scaler" in state) == (used == "fp16")
    history = train_epochs(tiny_model(), ctx, x, y, x, y, epochs=2, **kwargs)
    assert ctx.extra["resumed_from_epoch"] == 1 and [h["epoch"] for h in history] == [1, 2]
    name = torch.cuda.get_device_name(0)
    assert all(h["device"] == "cuda" and h["device_name"] == name and h["precision"] == used for h in history)
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in history)
    assert note is None or precision == "bf16"


@pytest.mark.integration
def test_the_gpu_worker_proof_script_passes() -> None:
    """bench/gpu_worker.py: a real cpu and gpu worker, the demo spec with device cuda and bf16, the
    gpu worker killed after epoch 1, a resume on CUDA, GPU names in the manifests and the report,
    and the artifacts scored the same by a CPU-only process."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_worker.py")], cwd=ROOT, capture_output=True,
                         text=True, timeout=1800, env={**os.environ, "PYTHONPATH": str(ROOT)})
    result = json.loads(out.stdout)
    assert out.returncode == 0 and result["status"] == "ok", json.dumps(result["checks"], indent=2)
