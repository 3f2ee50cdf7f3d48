"""Building torchvision classifiers and fitting their head to a dataset's classes."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


def head_of(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier head: the last ``nn.Linear`` in registration order."""
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = (name, mod)
    if last is None:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear classifier head to replace; "
                          "pick an arch with a linear head (resnet, mobilenet, efficientnet, regnet, ...)")
    return last


def replace_head(model: nn.Module, num_classes: int) -> None:
    name, old = head_of(model)
    new = nn.Linear(old.in_features, num_classes)
    parent = model
    *path, leaf = name.split(".")
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, leaf, new)


def build_model(arch: str, num_classes: int, weights: str | None = None,
                checkpoint: Path | None = None, checkpoint_name: str | None = None) -> nn.Module:
    """A torchvision ``arch`` with a head for ``num_classes``.

    ``weights`` is a torchvision weights name (loaded from torch's hub cache); ``checkpoint`` a
    local state_dict file (loaded with ``weights_only=True``). A head whose size differs from
    ``num_classes`` is replaced: that is the transfer-learning step.
    """
    import torchvision

    if weights and checkpoint:
        raise ConfigError("give either a torchvision weights name or a checkpoint, not both")
    if weights:
        try:
            model = torchvision.models.get_model(arch, weights=weights)
        except (OSError, RuntimeError) as err:
            raise ConfigError(
                f"could not load torchvision weights {weights} for {arch} ({type(err).__name__}: {err}); "
                "without network access put the file in $TORCH_HOME/hub/checkpoints or give a "
                "checkpoint URI in model.weights") from None
        replace_head(model, num_classes)
        return model
    if checkpoint is None:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    state = load_state_dict(checkpoint)
    model = torchvision.models.get_model(arch, weights=None)
    head_name, head = head_of(model)
    head_w = state.get(f"{head_name}.weight")
    if head_w is not None and head_w.shape[0] != head.out_features:
        replace_head(model, head_w.shape[0])
    shown = checkpoint_name or checkpoint.name
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # same names, other shapes: a checkpoint of another arch
        first = str(err).split("size mismatch", 1)[-1].strip()[:200]
        raise ConfigError(f"checkpoint {shown} does not fit {arch}: size mismatch {first}; check "
                          "model.arch matches the checkpoint") from None
    problems = list(result.missing_keys) + list(result.unexpected_keys)
    if problems:
        raise ConfigError(
            f"checkpoint {shown} does not fit {arch}: missing {list(result.missing_keys)[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]}; check model.arch matches the checkpoint")
    if head_of(model)[1].out_features != num_classes:
        log.info("checkpoint head has %d outputs, dataset %d classes: replacing the head",
                 head_of(model)[1].out_features, num_classes)
        replace_head(model, num_classes)
    return model


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state_dict (or a dict holding one under 'model'/'state_dict') without pickle."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise ConfigError(
            f"checkpoint {path.name} cannot be loaded with torch.load(weights_only=True) "
            f"({type(err).__name__}): save a plain state_dict (torch.save(model.state_dict(), f))") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"checkpoint {path.name} is not a state_dict of tensors")
    return obj
