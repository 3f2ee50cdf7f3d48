"""qat (gpu queue): quantization-aware fine-tuning from the fp32 checkpoint, then int8. Always in
fp32 and the default memory layout, on CUDA too: the fake-quantize observers measure the ranges
the int8 model will have, which autocast's bf16/fp16 activations would distort.

With ``export_onnx`` the trained model is also written as ONNX QDQ (``export_onnx_qdq``), the
same int8 model for ONNX Runtime and OpenVINO; an export failure leaves the TorchScript form
standing and is recorded in ``export_errors``, as the quantize stage does."""

from __future__ import annotations

import logging

from pipeline.errors import StageError
from pipeline.quant import convert_qat, prepare_qat
from pipeline.runtimes import export_onnx_qdq
from pipeline.stages import StageContext
from pipeline.stages.common import example_input, int8_result, load_fp32, load_split, norm
from pipeline.stages.configs import QatConfig
from pipeline.train import device_record, pick_device, train_epochs

log = logging.getLogger(__name__)


def qat(ctx: StageContext, cfg: QatConfig, inputs: dict) -> dict:
    data, fp32 = inputs["data"], inputs["model"]
    device = pick_device(cfg.device, "qat")
    example = example_input(data)
    prepared = prepare_qat(load_fp32(ctx, fp32, data), example, backend=cfg.backend, arch=cfg.arch)
    x, y = load_split(ctx, data, "train")
    xv, yv = load_split(ctx, data, "val")
    history = train_epochs(prepared, ctx, x, y, xv, yv, epochs=cfg.epochs, batch_size=cfg.batch_size,
                           lr=cfg.lr, momentum=cfg.momentum, weight_decay=0.0, device=device, seed=cfg.seed,
                           label="qat epoch", **norm(data))
    outputs, extra = {}, {}
    if cfg.export_onnx:  # before convert_qat, which converts the trained model in place
        try:
            outputs["onnx"] = ctx.put("model.onnx", export_onnx_qdq(prepared, example, ctx.workdir / "model.onnx"))
        except StageError as err:  # the TorchScript form stands alone; the benchmark says why ONNX is absent
            extra["export_errors"] = {"onnx": str(err)}
            log.warning("%s: %s", cfg.variant, err)
    qmodel = convert_qat(prepared)
    result = int8_result(ctx, qmodel, example, outputs)
    return {
        "classes": data["classes"],
        "preprocess": data["preprocess"],
        "method": "qat",
        "backend": cfg.backend,
        "history": history,
        **device_record(device),
        "precision": "fp32",
        "resumed_from_epoch": ctx.extra.get("resumed_from_epoch", 0),
        **{k: v for k, v in result.items() if k != "outputs"},
        **extra,
        "outputs": result["outputs"],
    }
