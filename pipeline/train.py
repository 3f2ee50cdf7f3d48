"""The one training loop and the one evaluation loop, shared by fp32 fine-tuning, QAT,
calibration (evaluation without labels) and benchmarking."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

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
    ckpts = [k for k in ctx.store.list(f"{ctx.prefix}/checkpoints") if k.endswith(".pt")]
    if ckpts:
        local = ctx.store.get_file(ckpts[-1], ctx.workdir / "resume.pt")
        state = torch.load(local, map_location=device, weights_only=True)
        local.unlink()
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, start = list(state["history"]), int(state["epoch"])
        ctx.extra["resumed_from_epoch"] = start
    for epoch in range(start, epochs):
        t0 = time.perf_counter()

        def on_batch(done: int, total: int, epoch: int = epoch) -> None:
            ctx.progress((epoch + done / total) / epochs, f"{label} {epoch + 1}/{epochs} batch {done}/{total}")
            ctx.check_cancelled()

        tr = train_one_epoch(model, x, y, optimizer, batch_size=batch_size, mean=mean, std=std, device=device,
                             generator=generator, on_batch=counting(ctx, "train", len(y), batch_size, on_batch),
                             frozen_bn=frozen_bn)
        seconds = time.perf_counter() - t0
        ev = evaluate(model, xv, yv, batch_size=max(batch_size, 64), mean=mean, std=std, device=device,
                      on_batch=counting(ctx, "eval", len(yv), max(batch_size, 64)))
        history.append({"epoch": epoch + 1, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
                        "val_loss": ev["loss"], "val_accuracy": ev["accuracy"], "seconds": round(seconds, 3),
                        "images_per_second": round(len(y) / seconds, 1), "device": device.type})
        local = ctx.workdir / "checkpoint.pt"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                    "history": history, "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state()}, local)
        ctx.store.put_file(f"{ctx.prefix}/checkpoints/epoch-{epoch + 1:04d}.pt", local)
        local.unlink()
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
