"""The one training loop and the one evaluation loop, shared by fp32 fine-tuning, QAT,
calibration (evaluation without labels) and benchmarking.

Training checkpoints every epoch to the stage's ``checkpoints/`` folder in the store:
``epoch-NNNN.pt`` and then ``epoch-NNNN.pt.json``, the checkpoint's sha256 and size. A resume
loads the newest checkpoint whose bytes match that record and that ``torch.load`` accepts, and
falls back to the one before it otherwise (a truncated upload, bit rot, a crash between the two
writes), so a damaged checkpoint costs one epoch, never the run.

On CUDA the loops keep the GPU fed: batches are gathered into pinned host memory as uint8 and
normalised on the device, the loss and the correct count are summed on the device and read once
per pass, and ``precision`` bf16/fp16 trains under autocast (fp16 with a gradient scaler, whose
state is checkpointed). On the CPU the arithmetic is the one it always was, op for op: the sums are
float64 and int64 tensors, which round exactly as the Python floats and ints they replace, so a
seed gives the same numbers as before. Determinism holds on the CPU; on CUDA ``deterministic_cuda``
sets what cuDNN and cuBLAS allow, which narrows but does not close the gap between two runs."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import CorruptArtifact, DeviceUnavailable, OutOfMemory
from pipeline.store import ArtifactMissing, ArtifactRef

log = logging.getLogger(__name__)
BatchHook = Callable[[int, int], None]  # (batches done, batches in the pass)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def normalize(x: torch.Tensor, mean: Sequence[float] | torch.Tensor,
              std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float NCHW, as ToTensor then Normalize(mean, std), on ``x``'s device.
    ``mean`` and ``std`` may already be float32 tensors there (made once per pass, not per batch)."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float().div_(255.0) - m) / s


def to_device(t: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t[idx]`` on ``device``. For CUDA the rows are gathered straight into pinned host memory
    and copied without waiting, so the copy overlaps the GPU's work (torch's pinned allocator
    keeps the block until the copy is done); elsewhere this is exactly ``t[idx]``."""
    if device.type != "cuda":
        return t[idx]
    pinned = torch.empty((len(idx), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
    return torch.index_select(t, 0, idx, out=pinned).to(device, non_blocking=True)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for ``precision`` bf16/fp16; nothing at all for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


@contextlib.contextmanager
def deterministic_cuda(device: torch.device) -> Iterator[None]:
    """While training on CUDA: the deterministic cuDNN kernels, no autotuning (which picks
    kernels by timing), and torch's deterministic algorithms where they exist (a warning, not an
    error, for an op that has none). cuBLAS needs CUBLAS_WORKSPACE_CONFIG before it starts, which
    in a stage's fresh pool process is later than this. The flags are global to the process, so
    they are restored on the way out. Same seed, same GPU, same software: usually the same
    numbers, but atomics in some backward kernels still vary; the CPU is where runs repeat
    exactly. Nothing changes on the CPU."""
    if device.type != "cuda":
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    cudnn = torch.backends.cudnn
    saved = (cudnn.deterministic, cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn.deterministic, cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


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


def _sums(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A pass's running loss (float64: rounds as the Python float it replaced) and correct count,
    kept on ``device`` so that no batch waits for the GPU to report them."""
    return (torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), dtype=torch.int64, device=device))


def train_one_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer, *,
                    batch_size: int, mean: Sequence[float], std: Sequence[float], device: torch.device,
                    generator: torch.Generator, on_batch: BatchHook | None = None,
                    frozen_bn: bool = False, precision: str = "fp32", scaler: torch.amp.GradScaler | None = None,
                    channels_last: bool = False) -> dict[str, float]:
    """One pass over (x, y), uint8 images normalised on ``device``. ``frozen_bn`` keeps batch-norm
    statistics fixed (a frozen backbone); ``precision`` bf16/fp16 runs the forward pass under
    autocast, and fp16 needs ``scaler``. The loss and accuracy are read once, at the end."""
    model.train()
    if frozen_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    loss_fn = nn.CrossEntropyLoss()
    mean_t, std_t = (torch.as_tensor(v, dtype=torch.float32, device=device) for v in (mean, std))
    (total_loss, correct), seen = _sums(device), 0
    n_batches = (len(y) + batch_size - 1) // batch_size
    for i, idx in enumerate(batches(len(y), batch_size, generator)):
        xb = normalize(to_device(x, idx, device), mean_t, std_t)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        yb = to_device(y, idx, device)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            out = model(xb)
            loss = loss_fn(out, yb)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total_loss += loss.detach().double() * len(idx)
        correct += (out.argmax(1) == yb).sum()
        seen += len(idx)
        if on_batch:
            on_batch(i + 1, n_batches)
    return {"loss": total_loss.item() / max(seen, 1), "accuracy": correct.item() / max(seen, 1)}


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


# Batch-norm running statistics that move this slowly (torchvision's MobileNetV3 uses 0.01, MNASNet
# 0.0003) are far from the weights' true statistics after a short fine-tune: the model trains, but
# evaluates at chance (mobilenet_v3_large on digits: train loss 0.08, val top-1 0.10 after 4
# epochs). Such models get their statistics recomputed over the training images after each epoch.
SLOW_BN_MOMENTUM = 0.1


def slow_batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch-norm layers whose running statistics update more slowly than torch's default."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.momentum is not None and m.momentum < SLOW_BN_MOMENTUM]


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, x: torch.Tensor, *, batch_size: int, mean: Sequence[float],
                       std: Sequence[float], device: torch.device, channels_last: bool = False) -> int:
    """Recompute every batch-norm layer's running mean and variance as the plain average over one
    pass of ``x`` (in order, no augmentation, no gradients), then restore each layer's momentum.
    Returns the number of layers recomputed. Deterministic: the same weights and images give the
    same statistics wherever it runs."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    was_training = model.training
    mean_t, std_t = (torch.as_tensor(v, dtype=torch.float32, device=device) for v in (mean, std))
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches of this pass
        model.train()
        for idx in batches(len(x), batch_size, None):
            xb = normalize(to_device(x, idx, device), mean_t, std_t)
            model(xb.contiguous(memory_format=torch.channels_last) if channels_last else xb)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return len(norms)


def train_epochs(model: nn.Module, ctx, x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor, *,
                 epochs: int, batch_size: int, lr: float, momentum: float, weight_decay: float,
                 mean: Sequence[float], std: Sequence[float], device: torch.device, seed: int,
                 frozen_bn: bool = False, label: str = "epoch", precision: str = "fp32",
                 channels_last: bool = False, recompute_slow_bn: bool = False) -> list[dict]:
    """Train with SGD for ``epochs``, checkpointing each epoch to the store and resuming from the
    newest checkpoint there (a redelivered task continues where the killed one stopped).
    ``ctx`` is the StageContext; returns the per-epoch history. ``precision`` (see
    ``training_precision``) and ``channels_last`` apply on CUDA; a stage asks for them.
    ``recompute_slow_bn``: recompute slow-moving batch-norm statistics after each epoch (see
    ``SLOW_BN_MOMENTUM``; the fine-tune asks for it, QAT starts from settled statistics)."""
    with deterministic_cuda(device):
        return _train_epochs(model, ctx, x, y, xv, yv, epochs=epochs, batch_size=batch_size, lr=lr,
                             momentum=momentum, weight_decay=weight_decay, mean=mean, std=std, device=device,
                             seed=seed, frozen_bn=frozen_bn, label=label, precision=precision,
                             channels_last=channels_last and device.type == "cuda",
                             precise_bn=recompute_slow_bn and not frozen_bn and bool(slow_batch_norms(model)))


def _train_epochs(model: nn.Module, ctx, x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor, *,
                  epochs: int, batch_size: int, lr: float, momentum: float, weight_decay: float,
                  mean: Sequence[float], std: Sequence[float], device: torch.device, seed: int, frozen_bn: bool,
                  label: str, precision: str, channels_last: bool, precise_bn: bool) -> list[dict]:
    generator = seed_everything(seed)
    model.to(device)
    if channels_last:  # NHWC: what the tensor cores' convolutions read fastest
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    # fp16's narrow range underflows small gradients: scale the loss up, and the gradients back
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    named = device_record(device)["device_name"]
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
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history, start = list(state["history"]), int(state["epoch"])
        ctx.extra["resumed_from_epoch"] = start
    if precise_bn:
        log.info("%s: batch-norm momentum below %s: running statistics are recomputed over the training "
                 "images after each epoch", label, SLOW_BN_MOMENTUM)
    for epoch in range(start, epochs):
        t0 = time.perf_counter()

        def on_batch(done: int, total: int, epoch: int = epoch) -> None:
            ctx.progress((epoch + done / total) / epochs, f"{label} {epoch + 1}/{epochs} batch {done}/{total}")
            ctx.check_cancelled()

        try:
            tr = train_one_epoch(model, x, y, optimizer, batch_size=batch_size, mean=mean, std=std, device=device,
                                 generator=generator, on_batch=counting(ctx, "train", len(y), batch_size, on_batch),
                                 frozen_bn=frozen_bn, precision=precision, scaler=scaler, channels_last=channels_last)
            if precise_bn:  # see SLOW_BN_MOMENTUM
                recompute_bn_stats(model, x, batch_size=max(batch_size, 64), mean=mean, std=std, device=device,
                                   channels_last=channels_last)
            seconds = time.perf_counter() - t0
            ev = evaluate(model, xv, yv, batch_size=max(batch_size, 64), mean=mean, std=std, device=device,
                          on_batch=counting(ctx, "eval", len(yv), max(batch_size, 64)), precision=precision,
                          channels_last=channels_last)
        except torch.cuda.OutOfMemoryError as err:
            raise out_of_memory(ctx, err, device, batch_size) from err
        history.append({"epoch": epoch + 1, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
                        "val_loss": ev["loss"], "val_accuracy": ev["accuracy"], "seconds": round(seconds, 3),
                        "images_per_second": round(len(y) / seconds, 1), "device": device.type,
                        "device_name": named, "precision": precision}
                       | ({"bn_stats": "recomputed"} if precise_bn else {}))
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                 "history": history, "generator": generator.get_state(), "torch_rng": torch.get_rng_state()}
        if device.type == "cuda":  # only then: a CPU-only run must never initialise CUDA
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        save_checkpoint(ctx, epoch + 1, state)
    return history


@torch.no_grad()
def evaluate(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor | None, *,
             batch_size: int, mean: Sequence[float], std: Sequence[float],
             device: torch.device = torch.device("cpu"), on_batch: BatchHook | None = None,
             precision: str = "fp32", channels_last: bool = False) -> dict[str, float]:
    """Top-1 accuracy (and loss) over ``x``; with ``y=None`` it only runs the model (calibration).
    The sums stay on ``device`` until the end, as in ``train_one_epoch``."""
    if isinstance(model, nn.Module):
        model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    mean_t, std_t = (torch.as_tensor(v, dtype=torch.float32, device=device) for v in (mean, std))
    total_loss, correct = _sums(device)
    n_batches = (len(x) + batch_size - 1) // batch_size
    for i, idx in enumerate(batches(len(x), batch_size)):
        xb = normalize(to_device(x, idx, device), mean_t, std_t)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            out = model(xb)
            if y is not None:
                yb = to_device(y, idx, device)
                total_loss += loss_fn(out, yb).double()
                correct += (out.argmax(1) == yb).sum()
        if on_batch:
            on_batch(i + 1, n_batches)
    if y is None:
        return {}
    return {"loss": total_loss.item() / max(len(y), 1), "accuracy": correct.item() / max(len(y), 1)}


def pick_device(preference: str, stage: str = "finetune") -> torch.device:
    """The device ``preference`` (finetune.device) names here. ``cuda`` on a worker without a
    usable CUDA device raises DeviceUnavailable, which the worker answers by requeueing the stage
    for another worker, instead of failing it for good."""
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if preference == "cuda":
        try:  # in the stage's own process: the parent of a prefork worker never initialises CUDA
            torch.cuda.init()
            why = "no CUDA device is visible"
        except Exception as err:  # the driver's or the build's own words
            why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise DeviceUnavailable(
            f"{stage} needs CUDA (finetune.device: cuda), and this worker has no usable CUDA device: {why}"
            + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
            + ". Requeued for a worker with CUDA: start a gpu worker on a machine with an NVIDIA GPU "
            "(qpipe worker --queues gpu --require-cuda), or set finetune.device: auto to train on the CPU")
    return torch.device("cpu")


def training_precision(asked: str, device: torch.device) -> tuple[str, str | None]:
    """The precision a stage trains in on ``device``, and why it is not ``asked`` (None when it
    is). Mixed precision is for CUDA: the spec refuses it with device: cpu, and with device: auto
    on a worker without CUDA the stage trains in fp32 instead of failing, and says so; bf16 on a
    GPU without native bf16 (before compute capability 8.0) trains in fp32 too."""
    if asked == "fp32":
        return asked, None
    if device.type != "cuda":
        return "fp32", f"precision {asked} needs CUDA and this worker trained on the {device.type}: trained in fp32"
    if asked == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        name = torch.cuda.get_device_name(device)
        return "fp32", f"precision bf16: {name} has no native bf16: trained in fp32 (fp16 would run there)"
    return asked, None


def device_record(device: torch.device) -> dict[str, Any]:
    """What a training stage ran on, for its manifest: the device type, its name (the GPU's, or
    "cpu"), and the CUDA_VISIBLE_DEVICES its worker process was given (None when unset)."""
    return {"device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
