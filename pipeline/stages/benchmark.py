"""benchmark (cpu): load a deployable artifact the way a user would (``torch.jit.load``),
measure top-1 on the validation split, latency per batch size after warm-up, throughput and
size, and store the artifact next to a manifest that carries those measurements.

Each batch size is timed on a freshly loaded module: an int8 TorchScript module keeps
specialising for the batch size it first ran (oneDNN), so one loaded for the accuracy pass at
batch 64 ran batch 1 about twice as slowly as a fresh one (measured by bench/peers.py). A
deployed model is loaded once and serves one batch size; so is each timing here.

A static variant exported as ONNX QDQ is measured the same way on each runtime of
``cfg.runtimes`` (ONNX Runtime, OpenVINO; ``pipeline.runtimes``), and so is the fp32 baseline,
exported here as a float ONNX model (``export_onnx_fp32``), so that speedups are against the
fastest fp32 form rather than its TorchScript file. OpenVINO is measured on the model's
OpenVINO form stored as an IR next to the manifest (``openvino_ir``), read as a deployment
reads it. ``runtimes`` in the manifest holds every
form's top-1, latency and size (TorchScript's too; OpenVINO's with the precision its plugin ran
the float parts in). A runtime whose package is missing, or a model without an export, is listed
in ``skipped_runtimes`` with the reason.

A variant quantized by another engine (``cfg.engine``: nncf, onnxruntime) has no TorchScript
form: its model (OpenVINO IR, ONNX QDQ) is measured the same way on each runtime of
``cfg.runtimes``, read as the engine wrote it (``engine_benchmark``); the first runtime measured
is its reference form, whose figures fill ``metrics``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.bench import measure_latency, threads
from pipeline.engines import LOAD_WITH
from pipeline.errors import StageError
from pipeline.quant import load_torchscript, set_engine
from pipeline.runtimes import OvRunner, export_onnx_fp32, load_runner, missing, save_openvino_ir
from pipeline.stages import StageContext
from pipeline.stages.common import example_input, load_fp32, load_split, norm
from pipeline.stages.configs import BenchmarkConfig
from pipeline.store import ArtifactRef
from pipeline.train import counting, evaluate, normalize

log = logging.getLogger(__name__)


def _rounded(latency: dict[str, dict]) -> dict[str, dict]:
    return {"latency_ms_p50": {bs: round(v["p50_ms"], 4) for bs, v in latency.items()},
            "latency_ms_p95": {bs: round(v["p95_ms"], 4) for bs, v in latency.items()},
            "throughput_ips": {bs: round(v["throughput_ips"], 2) for bs, v in latency.items()}}


def time_each_batch(ctx: StageContext, cfg: BenchmarkConfig, fresh, xv, n: dict, *, label: str = "",
                    progress: tuple[float, float] = (0.5, 0.3)) -> dict[str, dict]:
    """``pipeline.bench.measure_latency`` at each batch size of ``cfg``, each on a freshly
    loaded model ``fresh(batch_size)`` first called at that size (see the module docstring), on
    validation images; ``progress`` is the (start, span) of the stage's progress it covers."""
    import torch

    latency = {}
    sizes = cfg.batch_sizes
    for i, bs in enumerate(sizes):
        ctx.progress(progress[0] + progress[1] * i / len(sizes), f"{label}latency at batch {bs}")
        ctx.check_cancelled(every=0.0)
        idx = torch.arange(bs) % len(xv)
        latency[str(bs)] = measure_latency(fresh(bs), normalize(xv[idx], **n), warmup=cfg.warmup,
                                           iterations=cfg.iterations)
    return latency


def onnx_file(ctx: StageContext, cfg: BenchmarkConfig, producer: dict, data: dict) -> tuple[Path, ArtifactRef]:
    """The model's ONNX file here and its stored copy next to this manifest: the fp32 baseline
    exported now from the fine-tuned weights, a variant's export made by its quantize stage.
    Raises StageError, with the cause, where there is none."""
    if cfg.method == "fp32":
        path = export_onnx_fp32(load_fp32(ctx, producer, data), example_input(data), ctx.workdir / "model.onnx")
        return path, ctx.store.put_file(f"{ctx.prefix}/model.onnx", path)
    ref = producer["outputs"].get("onnx")
    if ref is None:
        raise StageError((producer.get("export_errors") or {}).get("onnx", "the quantize stage made no ONNX export"))
    return ctx.fetch(ref, "model.onnx"), ctx.store.copy(ArtifactRef.from_dict(ref), f"{ctx.prefix}/model.onnx")


def other_runtimes(ctx: StageContext, cfg: BenchmarkConfig, producer: dict, data: dict, xv, yv,
                   n: dict) -> tuple[dict, dict, dict]:
    """Top-1 and latency of the model's ONNX form (``onnx_file``) on each runtime of
    ``cfg.runtimes`` (ONNX Runtime, OpenVINO), timed like the TorchScript form: a fresh runner
    per batch size, first called at that size. Returns ({runtime: metrics}, {runtime: why it was
    skipped}, the stored ONNX file's reference or {})."""
    skipped = {rt: why for rt in cfg.runtimes if (why := missing(rt))}
    wanted = [rt for rt in cfg.runtimes if rt not in skipped]
    if wanted:
        try:
            path, artifact = onnx_file(ctx, cfg, producer, data)
        except StageError as err:  # the TorchScript form is measured all the same
            skipped |= {rt: f"no ONNX export: {err}" for rt in wanted}
            wanted = []
    for rt, why in skipped.items():
        log.info("%s: %s skipped: %s", cfg.variant, rt, why)
    out, exported = {}, ({"onnx": artifact} if wanted else {})
    for rt in wanted:
        file, form, size = path, artifact, artifact.size
        if rt == "openvino":  # the IR a deployment reads, measured as it reads it: see openvino_ir
            file, form, exported["weights"] = openvino_ir(ctx, path)
            exported["openvino_ir"], size = form, form.size + exported["weights"].size
        out[rt] = {**measure_form(ctx, cfg, rt, lambda bs, rt=rt, f=file: file_runner(rt, f, cfg.threads, bs), xv, yv,
                                  n),
                   "size_bytes": size, "artifact": form.uri}
    return out, {rt: skipped[rt] for rt in cfg.runtimes if rt in skipped}, {k: a.to_dict() for k, a in exported.items()}


def openvino_ir(ctx: StageContext, onnx_path: Path) -> tuple[Path, ArtifactRef, ArtifactRef]:
    """The OpenVINO form of a model's ONNX file written as IR (``pipeline.runtimes.save_openvino_ir``:
    for an int8 QDQ file, quantizers placed and activations folded as qpipe's OpenVINO runner
    serves them) and stored next to this manifest: (model.xml here, the stored .xml, the stored
    .bin). OpenVINO is measured on this IR as ``Core.read_model`` reads it, so its figures are
    those of the file ``qpipe pull`` hands a deployment, which needs no qpipe code to read it."""
    xml, weights = save_openvino_ir(onnx_path, ctx.workdir / "model.xml")
    return (xml, ctx.store.put_file(f"{ctx.prefix}/model.xml", xml),
            ctx.store.put_file(f"{ctx.prefix}/model.bin", weights))


def measure_form(ctx: StageContext, cfg: BenchmarkConfig, runtime: str, load: Callable[[int | None], Any], xv, yv,
                 n: dict) -> dict:
    """Top-1 on the validation split and latency at each batch size of one model form on
    ``runtime``; ``load(batch_size)`` gives a freshly loaded runner (None: for any batch size),
    timed like the TorchScript form (``time_each_batch``)."""
    ctx.progress(0.8, f"{runtime}: accuracy")
    ctx.check_cancelled(every=0.0)
    runner = load(None)
    acc = evaluate(runner, xv, yv, batch_size=64, **n)["accuracy"]
    ctx.images(len(yv), "eval")
    latency = time_each_batch(ctx, cfg, load, xv, n, label=f"{runtime}: ", progress=(0.85, 0.1))
    precision = getattr(runner, "precision", None)  # OpenVINO's for the float parts (bf16 on CPUs with AMX)
    return {"accuracy_top1": acc, **_rounded(latency), **({"inference_precision": precision} if precision else {})}


def file_runner(runtime: str, path: Path, n_threads: int, batch_size: int | None) -> Callable:
    """A runner of a model file as a user loads it with the runtime's own API: OpenVINO reads an
    IR (another engine's, or the one ``openvino_ir`` stores) with ``Core.read_model``, no qpipe
    code in between; ONNX Runtime and TorchScript load the file like any other."""
    if runtime == "openvino":
        import openvino as ov

        return OvRunner(ov.Core().read_model(str(path)), n_threads, batch_size)
    return load_runner(runtime, path, threads=n_threads, batch_size=batch_size)


def engine_benchmark(ctx: StageContext, cfg: BenchmarkConfig, data: dict, producer: dict) -> dict:
    """The benchmark of another engine's model (see the module docstring): each runtime of
    ``cfg.runtimes`` it can be loaded on measured alike; the model file (and an IR's weights)
    stored next to the manifest. Raises StageError when none of those runtimes is installed."""
    skipped = {rt: why for rt in cfg.runtimes if (why := missing(rt))}
    wanted = [rt for rt in cfg.runtimes if rt not in skipped]
    if not wanted:
        raise StageError(f"{cfg.engine}'s model of {cfg.variant} runs on {', '.join(cfg.runtimes) or 'no runtime'}, "
                         f"and none of them can be loaded here: {'; '.join(skipped.values()) or 'none listed'}")
    refs = producer["outputs"]
    roles = [r for r in ("model", "weights") if r in refs]  # an IR's .bin is read from next to its .xml
    names = {r: PurePosixPath(refs[r]["uri"]).name for r in roles}
    path = {r: ctx.fetch(refs[r], names[r]) for r in roles}["model"]
    artifacts = {r: ctx.store.copy(ArtifactRef.from_dict(refs[r]), f"{ctx.prefix}/{names[r]}") for r in roles}
    size = sum(a.size for a in artifacts.values())
    xv, yv = load_split(ctx, data, "val")
    n = norm(data)
    forms = {}
    with threads(cfg.threads):
        for rt in wanted:
            forms[rt] = {**measure_form(ctx, cfg, rt, lambda bs, rt=rt: file_runner(rt, path, cfg.threads, bs),
                                        xv, yv, n), "size_bytes": size, "artifact": artifacts["model"].uri}
    for rt, why in skipped.items():
        log.info("%s: %s skipped: %s", cfg.variant, rt, why)
    reference = forms[wanted[0]]
    return {
        "name": cfg.variant,
        "method": cfg.method,
        "engine": cfg.engine,
        "classes": data["classes"],
        "preprocess": data["preprocess"],
        "format": producer["format"],
        "load_with": LOAD_WITH[producer["format"]],
        "metrics": {
            "accuracy_top1": reference["accuracy_top1"],
            **{f: reference[f] for f in ("latency_ms_p50", "latency_ms_p95", "throughput_ips")},
            "size_bytes": size,
            "threads": cfg.threads,
            "val_images": len(yv),
        },
        "reference_runtime": wanted[0],
        "runtimes": forms,
        **({"skipped_runtimes": skipped} if skipped else {}),
        "engine_settings": producer.get("engine_settings"),
        "quantizers": producer.get("quantizers"),
        "int8_layers": producer.get("int8_layers"),
        "fp32_layers": producer.get("fp32_layers"),
        "layers": [],
        "history": [],
        "produced_by": {"stage": producer["stage"], "key": producer["key"], "model_sha256": refs["model"]["sha256"]},
        "spec_sha256": ctx.extra.get("spec_sha256"),
        "outputs": {role: a.to_dict() for role, a in artifacts.items()},
    }


def benchmark(ctx: StageContext, cfg: BenchmarkConfig, inputs: dict) -> dict:
    data, producer = inputs["data"], inputs["model"]
    if cfg.engine != "qpipe":  # another engine's model: no TorchScript form
        return engine_benchmark(ctx, cfg, data, producer)
    set_engine(cfg.backend)
    model_ref = producer["outputs"]["model"]
    path = ctx.fetch(model_ref, "model.ts")
    model = load_torchscript(path)
    xv, yv = load_split(ctx, data, "val")
    n = norm(data)
    with threads(cfg.threads):
        def on_batch(done: int, total: int) -> None:
            ctx.progress(0.5 * done / total, f"accuracy {min(done * 64, len(yv))}/{len(yv)} images")
            ctx.check_cancelled()

        acc = evaluate(model, xv, yv, batch_size=64, on_batch=counting(ctx, "eval", len(yv), 64, on_batch),
                       **n)["accuracy"]
        latency = time_each_batch(ctx, cfg, lambda bs: load_torchscript(path), xv, n)
        fallback = producer.get("fallback")
        if fallback and "all_int8" in producer["outputs"]:  # what keeping layers fp32 costs, timed alike
            all_int8 = ctx.fetch(producer["outputs"]["all_int8"], "all-int8.ts")
            timed = time_each_batch(ctx, cfg, lambda bs: load_torchscript(all_int8), xv, n, label="all-int8 ",
                                    progress=(0.8, 0.05))
            base = {bs: v["p50_ms"] for bs, v in timed.items()}
            fallback = {**fallback, "latency_ms_p50_all_int8": {bs: round(v, 4) for bs, v in base.items()},
                        "latency_cost_ms": {bs: round(latency[bs]["p50_ms"] - base[bs], 4) for bs in base}}
        runtimes, skipped, exported = other_runtimes(ctx, cfg, producer, data, xv, yv, n)
    artifact = ctx.store.copy(ArtifactRef.from_dict(model_ref), f"{ctx.prefix}/model.ts")
    return {
        "name": cfg.variant,
        "method": cfg.method,
        "classes": data["classes"],
        "preprocess": data["preprocess"],
        "format": producer.get("format", "torchscript"),
        "load_with": "torch.jit.load",
        "backend": cfg.backend,
        "metrics": {
            "accuracy_top1": acc,
            **_rounded(latency),
            "size_bytes": artifact.size,
            "threads": cfg.threads,
            "val_images": len(yv),
        },
        "runtimes": {"torchscript": {"accuracy_top1": acc, **_rounded(latency), "size_bytes": artifact.size,
                                     "artifact": artifact.uri}} | runtimes,
        **({"skipped_runtimes": skipped} if skipped else {}),
        "int8_layers": producer.get("int8_layers"),
        "fp32_layers": producer.get("fp32_layers"),
        "layers": producer.get("layers", []),
        "history": producer.get("history", []),
        **({"sensitivity": producer["sensitivity"]} if producer.get("sensitivity") else {}),
        **({"fallback": fallback} if fallback else {}),
        "produced_by": {"stage": producer["stage"], "key": producer["key"], "model_sha256": model_ref["sha256"]},
        "spec_sha256": ctx.extra.get("spec_sha256"),
        "outputs": {"model": artifact.to_dict(), **exported},
    }
