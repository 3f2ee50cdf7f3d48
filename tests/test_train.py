"""pipeline/train.py: slow-moving batch-norm statistics are recomputed after each fine-tune epoch.

torchvision's MobileNetV3 moves its running statistics by 1% per batch (MNASNet by 0.03%): after
a short fine-tune from scratch they still hold mostly their initial values, and the model, which
trained, evaluates at chance (mobilenet_v3_large from scratch on digits at 64x64: train loss 0.08,
val top-1 0.10 after 4 epochs with AdamW lr 0.002; with the statistics recomputed, 0.94 after 3
epochs with SGD lr 0.05, momentum 0.9; batch 32, cosine schedule with warm-up, one thread, on a
2-vCPU Intel Xeon)."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from pipeline.train import recompute_bn_stats, slow_batch_norms


def test_slow_batch_norms_are_found_where_torchvision_sets_a_small_momentum() -> None:
    assert slow_batch_norms(torchvision.models.mobilenet_v3_small(num_classes=10))
    assert not slow_batch_norms(torchvision.models.resnet18(num_classes=10))
    assert not slow_batch_norms(torchvision.models.mobilenet_v2(num_classes=10))


def test_recomputed_statistics_are_the_plain_average_over_the_images_and_the_momentum_is_restored() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, bias=False)
    bn = nn.BatchNorm2d(4, momentum=0.01)
    model = nn.Sequential(conv, bn).eval()
    x = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    assert recompute_bn_stats(model, x, batch_size=8, mean=mean, std=std, device=torch.device("cpu")) == 1
    assert bn.momentum == 0.01 and not model.training
    with torch.no_grad():
        xn = (x.float() / 255.0 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        out = conv(xn)
    # five equal batches: the cumulative average of the batch means is the mean over all images
    assert torch.allclose(bn.running_mean, out.mean(dim=(0, 2, 3)), atol=1e-5)
    per_batch_var = torch.stack([out[i:i + 8].var(dim=(0, 2, 3), unbiased=True) for i in range(0, 40, 8)])
    assert torch.allclose(bn.running_var, per_batch_var.mean(0), atol=1e-5)
    assert int(bn.num_batches_tracked) == 5


def test_the_finetune_stage_recomputes_a_mobilenet_v3s_statistics_and_says_so(tmp_path) -> None:
    from pipeline.stages import execute
    from pipeline.store import FileStore
    from tests.helpers import nodes_of, one_torch_thread

    spec = {"name": "bn", "seed": 0, "data": {"source": "builtin:digits", "image_size": 16, "calib_size": 8},
            "model": {"arch": "mobilenet_v3_small"}, "finetune": {"epochs": 1, "batch_size": 64, "lr": 0.01},
            "quantize": {"variants": [{"name": "d", "method": "dynamic"}]}}
    store = FileStore(tmp_path)
    plan = nodes_of(spec, store)
    with one_torch_thread():
        execute(plan["ingest"], store)
        history = execute(plan["finetune"], store).manifest["history"]
    assert [h.get("bn_stats") for h in history] == ["recomputed"]
