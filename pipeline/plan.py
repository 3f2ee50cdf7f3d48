"""From a validated spec to a plan: the list of stage nodes, in dependency order, each with its
config, its inputs and its content address (key).

A node is plain JSON, which is what travels in a task message:
``{"id", "stage", "variant", "queue", "key", "config", "inputs": {name: {"stage", "key"}},
"input_digests"}``.
"""

from __future__ import annotations

from typing import Any

from pipeline.hashing import stage_key
from pipeline.spec import PipelineSpec, VariantSpec
from pipeline.stages import load_all

# config fields that do not change a stage's result and so stay out of its key
UNKEYED = {"device"}


def _node(stage: str, node_id: str, config: dict, inputs: dict[str, dict], *, variant: str | None = None,
          digests: dict[str, str] | None = None) -> dict[str, Any]:
    sdef = load_all()[stage]
    keyed = {k: v for k, v in config.items() if k not in UNKEYED}
    key_inputs = {name: dep["key"] for name, dep in inputs.items()} | (digests or {})
    return {
        "id": node_id,
        "stage": stage,
        "variant": variant,
        "queue": sdef.queue,
        "key": stage_key(stage, sdef.version, keyed, key_inputs),
        "config": config,
        "inputs": {name: {"stage": dep["stage"], "key": dep["key"], "id": dep["id"]} for name, dep in inputs.items()},
        "input_digests": digests or {},
    }


# observer -> the statistic its calibration records: the histogram observers (percentile, mse,
# entropy) differ only in the range they choose from one histogram, at conversion, so they share
# a calibration (pipeline.quant.CALIBRATION_STATISTIC, kept here without importing torch)
CALIBRATION_STATISTIC = {"minmax": "minmax", "moving_average_minmax": "moving_average_minmax",
                         "histogram": "histogram", "percentile": "histogram", "mse": "histogram",
                         "entropy": "histogram"}


def calibration_id(v: VariantSpec) -> str:
    return f"calibrate:{CALIBRATION_STATISTIC[v.observer]}"


def quantize_config(v: VariantSpec, backend: str, arch: str) -> dict[str, Any]:
    """The quantize stage's config: everything that changes the int8 model. Options at their
    default (no percentile, no bias correction) stay out, so existing keys do not move."""
    cfg: dict[str, Any] = {"variant": v.name, "method": v.method, "observer": v.observer,
                           "per_channel": v.per_channel, "backend": backend, "arch": arch}
    if v.percentile is not None:
        cfg["percentile"] = v.percentile
    if v.bias_correction:
        cfg["bias_correction"] = True
    return cfg


def sensitivity_config(v: VariantSpec, backend: str, arch: str, part: int, parts: int) -> dict[str, Any]:
    """A sensitivity part's config: what decides the int8 model (not the variant's name, so
    variants that convert alike share the parts), and which part of how many."""
    cfg = {k: val for k, val in quantize_config(v, backend, arch).items() if k not in ("variant", "bias_correction")}
    return cfg | {"part": part, "parts": parts}


def build_plan(spec: PipelineSpec, sources: dict[str, Any]) -> list[dict[str, Any]]:
    """``sources`` holds the prepared descriptions of ``data.source``, ``data.val_source`` and
    ``model.weights`` (see ``pipeline.sources.prepare_source``)."""
    d, m, f, q, b = spec.data, spec.model, spec.finetune, spec.quantize, spec.benchmark
    src, val = sources["source"], sources.get("val_source")
    digests = {"source": src["sha256"]} | ({"val_source": val["sha256"]} if val else {})
    ingest = _node("ingest", "ingest", {
        "source": src, "val_source": val, "val_fraction": d.val_fraction, "image_size": d.image_size,
        "calib_size": d.calib_size, "seed": spec.seed, "max_image_pixels": d.max_image_pixels,
        "max_archive_bytes": d.max_archive_bytes,
    }, {}, digests=digests)
    weights = sources.get("weights")
    finetune = _node("finetune", "finetune", {
        "arch": m.arch, "weights": weights, "epochs": f.epochs, "batch_size": f.batch_size, "lr": f.lr,
        "momentum": f.momentum, "weight_decay": f.weight_decay, "freeze_backbone": f.freeze_backbone,
        "seed": spec.seed, "device": f.device,
    }, {"data": ingest}, digests={"weights": weights["sha256"]} if weights else None)
    nodes = [ingest, finetune]
    bench_cfg = {"batch_sizes": b.batch_sizes, "threads": b.threads, "warmup": b.warmup,
                 "iterations": b.iterations, "backend": q.backend}
    benches = [_node("benchmark", "benchmark:fp32", {"variant": "fp32", "method": "fp32", **bench_cfg},
                     {"data": ingest, "model": finetune}, variant="fp32")]
    calibrations: dict[str, dict] = {}
    for v in q.variants:
        if v.method == "static":
            cid = calibration_id(v)
            if cid not in calibrations:
                calibrations[cid] = _node("calibrate", cid, {
                    "observer": CALIBRATION_STATISTIC[v.observer], "backend": q.backend, "arch": m.arch,
                    "seed": spec.seed,
                }, {"data": ingest, "model": finetune}, variant=None)
                nodes.append(calibrations[cid])
    for v in q.variants:
        if v.method == "qat":
            producer = _node("qat", f"qat:{v.name}", {
                "variant": v.name, "arch": m.arch, "backend": q.backend, "epochs": v.epochs, "lr": v.lr,
                "batch_size": v.batch_size or f.batch_size, "momentum": f.momentum, "seed": spec.seed,
                "device": f.device,
            }, {"data": ingest, "model": finetune}, variant=v.name)
        else:
            inputs = {"data": ingest, "model": finetune}
            config = quantize_config(v, q.backend, m.arch)
            if v.method == "static":
                inputs["calibration"] = calibrations[calibration_id(v)]
            if v.sensitivity:
                parts = [_node("sensitivity", f"sensitivity:{v.name}:{i}",
                               sensitivity_config(v, q.backend, m.arch, i, q.sensitivity_parts), dict(inputs),
                               variant=v.name) for i in range(q.sensitivity_parts)]
                nodes.extend(parts)
                inputs |= {f"sensitivity_{i}": part for i, part in enumerate(parts)}
                config["sensitivity"] = q.sensitivity_parts
            if v.fallback == "auto":
                config |= {"fallback": "auto", "accuracy_budget": b.accuracy_budget}
            producer = _node("quantize", f"quantize:{v.name}", config, inputs, variant=v.name)
        nodes.append(producer)
        benches.append(_node("benchmark", f"benchmark:{v.name}", {"variant": v.name, "method": v.method, **bench_cfg},
                             {"data": ingest, "model": producer}, variant=v.name))
    nodes.extend(benches)
    report_inputs = {"data": ingest} | {f"bench_{n['variant']}": n for n in benches}
    nodes.append(_node("report", "report", {
        "name": spec.name, "accuracy_budget": b.accuracy_budget, "batch_sizes": b.batch_sizes,
        "variants": [{"name": "fp32", "method": "fp32"}] + [{"name": v.name, "method": v.method} for v in q.variants],
    }, report_inputs))
    return nodes


def children(plan: list[dict]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {n["id"]: [] for n in plan}
    for n in plan:
        for dep in n["inputs"].values():
            out[dep["id"]].append(n["id"])
    return out
