"""The one training loop and the one evaluation loop, shared by fp32 fine-tuning, QAT,
calibration (evaluation without labels) and benchmarking.

Training checkpoints every epoch to the stage's ``checkpoints/`` folder in the store:
``epoch-NNNN.pt`` and then ``epoch-NNNN.pt.json``, the checkpoint's sha256 and size. A resume
loads the newest checkpoint whose bytes match that record and that ``torch.load`` accepts, and
falls back to the one before it otherwise (a truncated upload, bit rot, a crash between the two
writes), so a damaged checkpoint costs one epoch, never the run."""

from __future__ import annotations

import logging
import pickle
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import CorruptArtifact, OutOfMemory
from pipeline.store import ArtifactMissing, ArtifactRef

log = logging.getLogger(__name__)
BatchHook = Callable[[int, int], None]  # (batches done, batches in the pass)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 NCHW -> float NCHW, as ToTensor then Normalize(mean, std)."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x.float().div_(255.0) - m) / s


def batches(n: int, batch_size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def counting(ctx, phase: str, images: int, batch_size: int, hook: BatchHook | None = None) -> BatchHook:
    """Wrap ``hook`` for one pass over ``images`` images: every batch also counts its images with
    ``ctx.images`` (metrics), and the last one reports the pass's throughput since this call."""
    started = time.perf_counter()

    def on_batch(done: int, total: int) -> None:
        n = min(done * batch_size, images) - min((done - 1) * batch_size, images)
        elapsed = time.perf_counter() - started
        ctx.images(n, phase, images / elapsed if done == total and elapsed > 0 else None)
        if hook:
            hook(done, total)

    return on_batch


def train_one_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer, *,
                    batch_size: int, mean: Sequence[float], std: Sequence[float], device: torch.device,
                    generator: torch.Generator, on_batch: BatchHook | None = None,
                    frozen_bn: bool = False) -> dict[str, float]:
    """One pass over (x, y). ``frozen_bn`` keeps batch-norm statistics fixed (a frozen backbone)."""
    model.train()
    if frozen_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    loss_fn = nn.CrossEntropyLoss()
    total_loss, correct, seen = 0.0, 0, 0
    n_batches = (len(y) + batch_size - 1) // batch_size
    for i, idx in enumerate(batches(len(y), batch_size, generator)):
        xb = normalize(x[idx], mean, std).to(device, non_blocking=True)
        yb = y[idx].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        out = model(xb)
        loss = loss_fn(out, yb)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(idx)
        correct += (out.argmax(1) == yb).sum().item()
        seen += len(idx)
        if on_batch:
            on_batch(i + 1, n_batches)
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1)}


def save_checkpoint(ctx, epoch: int, state: dict[str, Any]) -> None:
    """Upload ``state`` as epoch ``epoch``'s checkpoint, then its digest record: a checkpoint
    without a record is never loaded, so a crash between the two writes only loses that epoch."""
    local = ctx.workdir / "checkpoint.pt"
    torch.save(state, local)
    key = f"{ctx.prefix}/checkpoints/epoch-{epoch:04d}.pt"
    ref = ctx.store.put_file(key, local)
    local.unlink()
    ctx.store.put_json(f"{key}.json", {"epoch": epoch, "sha256": ref.sha256, "size": ref.size})


def load_checkpoint(ctx) -> dict[str, Any] | None:
    """The newest checkpoint that matches its recorded sha256 and loads, on the CPU (the caller
    moves it to the device: loading straight onto a GPU would put the saved RNG states there,
    where ``set_state`` refuses them); None when there is none."""
    keys = [k for k in ctx.store.list(f"{ctx.prefix}/checkpoints") if k.endswith(".pt")]
    for key in reversed(keys):
        local = ctx.workdir / "resume.pt"
        try:
            record = ctx.store.get_json(f"{key}.json")
            path = ctx.store.fetch(ArtifactRef(ctx.store.url(key), record["sha256"], record["size"]), local)
            state = torch.load(path, map_location="cpu", weights_only=True)
        except ArtifactMissing as err:  # most often: the stage died between the checkpoint and its record
            why = f"it has no sha256 record to check it against ({err})"
        except CorruptArtifact as err:
            why = str(err)
        except (ValueError, KeyError, TypeError) as err:  # an unreadable digest record
            why = f"its digest record is unreadable ({type(err).__name__}: {err})"
        except (RuntimeError, EOFError, pickle.UnpicklingError) as err:  # matched its digest, yet does not load
            why = f"torch.load failed ({type(err).__name__}: {err})"
        else:
            log.info("%s: resuming from %s (epoch %s)", ctx.stage, ctx.store.url(key), state["epoch"])
            return state
        finally:
            local.unlink(missing_ok=True)
        log.warning("%s: checkpoint %s is unusable: %s; falling back to the one before it",
                    ctx.stage, ctx.store.url(key), why)
    return None


def out_of_memory(ctx, err: BaseException, device: torch.device, batch_size: int) -> OutOfMemory:
    """The stage error for an out-of-memory during training: what ran out, at which batch size,
    and what to change."""
    memory = f"{device.type} memory"
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        peak = torch.cuda.max_memory_allocated(device)
        memory = f"{device} memory ({peak / 2**30:.2f} GiB allocated at peak of {total / 2**30:.2f} GiB)"
    cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return OutOfMemory(f"{ctx.stage} ran out of {memory} at batch size {batch_size}: {cause}. Lower the batch "
                       "size (finetune.batch_size, or the QAT variant's batch_size) or data.image_size and "
                       "rerun; the checkpoints written so far are kept")


def train_epochs(model: nn.Module, ctx, x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor, *,
                 epochs: int, batch_size: int, lr: float, momentum: float, weight_decay: float,
                 mean: Sequence[float], std: Sequence[float], device: torch.device, seed: int,
                 frozen_bn: bool = False, label: str = "epoch") -> list[dict]:
    """Train with SGD for ``epochs``, checkpointing each epoch to the store and resuming from the
    newest checkpoint there (a redelivered task continues where the killed one stopped).
    ``ctx`` is the StageContext; returns the per-epoch history."""
    generator = seed_everything(seed)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    history: list[dict] = []
    start = 0
    state = load_checkpoint(ctx)
    if state is not None:
        model.load_state_dict(state["model"])  # copied into the parameters, on their device
        optimizer.load_state_dict(state["optimizer"])  # moves its buffers to the parameters' device
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            for i, rng in enumerate(state["cuda_rng"][:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(rng, i)
        history, start = list(state["history"]), int(state["epoch"])
        ctx.extra["resumed_from_epoch"] = start
    for epoch in range(start, epochs):
        t0 = time.perf_counter()

        def on_batch(done: int, total: int, epoch: int = epoch) -> None:
            ctx.progress((epoch + done / total) / epochs, f"{label} {epoch + 1}/{epochs} batch {done}/{total}")
            ctx.check_cancelled()

        try:
            tr = train_one_epoch(model, x, y, optimizer, batch_size=batch_size, mean=mean, std=std, device=device,
                                 generator=generator, on_batch=counting(ctx, "train", len(y), batch_size, on_batch),
                                 frozen_bn=frozen_bn)
            seconds = time.perf_counter() - t0
            ev = evaluate(model, xv, yv, batch_size=max(batch_size, 64), mean=mean, std=std, device=device,
                          on_batch=counting(ctx, "eval", len(yv), max(batch_size, 64)))
        except torch.cuda.OutOfMemoryError as err:
            raise out_of_memory(ctx, err, device, batch_size) from err
        history.append({"epoch": epoch + 1, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
                        "val_loss": ev["loss"], "val_accuracy": ev["accuracy"], "seconds": round(seconds, 3),
                        "images_per_second": round(len(y) / seconds, 1), "device": device.type})
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                 "history": history, "generator": generator.get_state(), "torch_rng": torch.get_rng_state()}
        if device.type == "cuda":  # only then: a CPU-only run must never initialise CUDA
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        save_checkpoint(ctx, epoch + 1, state)
    return history


@torch.no_grad()
def evaluate(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor | None, *,
             batch_size: int, mean: Sequence[float], std: Sequence[float],
             device: torch.device = torch.device("cpu"), on_batch: BatchHook | None = None) -> dict[str, float]:
    """Top-1 accuracy (and loss) over ``x``; with ``y=None`` it only runs the model (calibration)."""
    if isinstance(model, nn.Module):
        model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    n_batches = (len(x) + batch_size - 1) // batch_size
    for i, idx in enumerate(batches(len(x), batch_size)):
        out = model(normalize(x[idx], mean, std).to(device))
        if y is not None:
            yb = y[idx].to(device)
            total_loss += loss_fn(out, yb).item()
            correct += (out.argmax(1) == yb).sum().item()
        if on_batch:
            on_batch(i + 1, n_batches)
    if y is None:
        return {}
    return {"loss": total_loss / max(len(y), 1), "accuracy": correct / max(len(y), 1)}


def pick_device(preference: str) -> torch.device:
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if preference == "cuda":
        from pipeline.errors import ConfigError

        raise ConfigError("finetune.device is cuda but this worker has no CUDA device: use auto")
    return torch.device("cpu")
