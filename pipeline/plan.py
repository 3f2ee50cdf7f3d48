"""From a validated spec to a plan: the list of stage nodes, in dependency order, each with its
config, its inputs and its content address (key).

A node is plain JSON, which is what travels in a task message:
``{"id", "stage", "variant", "queue", "key", "config", "inputs": {name: {"stage", "key"}},
"input_digests"}``.

A sweep (``spec.sweep``) plans one ingest, then per arch what a single-arch spec plans: its
finetune, fp32 benchmark, calibrations, and every variant of every set. Node ids and variant
names then carry the arch (``quantize:ptq-minmax@resnet18``, variant ``ptq-minmax@resnet18``);
configs do not, beyond what they already held, so a node's key is the one the same arch and
variant get without a sweep.

Each node's config is its stage's typed config (``pipeline.stages.configs``) as JSON. Planning
reads only the stage table, never a stage's module, so it needs no torch.
"""

from __future__ import annotations

from typing import Any

from pipeline.hashing import stage_key
from pipeline.spec import CALIBRATION_STATISTIC, PipelineSpec, StaticVariant, VariantSpec
from pipeline.stages.configs import (
    BenchmarkConfig,
    CalibrateConfig,
    FinetuneConfig,
    IngestConfig,
    QatConfig,
    QuantizeConfig,
    ReportConfig,
    SensitivityConfig,
    StageConfig,
)
from pipeline.stages.table import JOIN, STAGES


def _node(stage: str, node_id: str, cfg: StageConfig, inputs: dict[str, dict], *, variant: str | None = None,
          digests: dict[str, str] | None = None) -> dict[str, Any]:
    sdef = STAGES[stage]
    if not isinstance(cfg, sdef.config):
        raise TypeError(f"stage {stage!r} takes a {sdef.config.__name__}, not a {type(cfg).__name__}")
    config = cfg.to_json()
    keyed = cfg.key_fields()
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


def calibration_id(v: StaticVariant) -> str:
    return f"calibrate:{CALIBRATION_STATISTIC[v.observer]}"


def activations(v: VariantSpec) -> str | None:
    """The activation scheme of a variant qpipe converts from a calibration (static, qpipe's own
    engine: the one CALIBRATED kind); None for the others."""
    return v.activations if v.CALIBRATED else None


def sensitivity_config(v: VariantSpec, backend: str, arch: str, part: int, parts: int) -> SensitivityConfig:
    """A sensitivity part's config: what decides the int8 model (not the variant's name, so
    variants that convert alike share the parts), and which part of how many."""
    return SensitivityConfig(method=v.method, observer=v.observer, per_channel=v.per_channel, backend=backend,
                             arch=arch, percentile=v.percentile, activations=activations(v), part=part, parts=parts,
                             latency=v.fallback == "latency")


def build_plan(spec: PipelineSpec, sources: dict[str, Any]) -> list[dict[str, Any]]:
    """``sources`` holds the prepared descriptions of ``data.source``, ``data.val_source`` and
    ``model.weights`` (see ``pipeline.sources.prepare_source``)."""
    d, b = spec.data, spec.benchmark
    src, val = sources["source"], sources.get("val_source")
    digests = {"source": src["sha256"]} | ({"val_source": val["sha256"]} if val else {})
    ingest = _node("ingest", "ingest", IngestConfig(
        source=src, val_source=val, val_fraction=d.val_fraction, image_size=d.image_size,
        calib_size=d.calib_size, seed=spec.seed, max_image_pixels=d.max_image_pixels,
        max_archive_bytes=d.max_archive_bytes,
    ), {}, digests=digests)
    nodes = [ingest]
    report_variants: list[dict[str, Any]] = []
    report_inputs: dict[str, dict] = {"data": ingest}
    sweep = spec.sweep is not None
    for arch in spec.archs():
        arch_nodes, benches = _arch_nodes(spec, sources, ingest, arch, sweep)
        nodes += arch_nodes
        for bench, set_name in benches:
            entry = {"name": bench["variant"], "method": bench["config"]["method"]}
            if "engine" in bench["config"]:  # another engine's (qpipe's is left out: report keys stay)
                entry["engine"] = bench["config"]["engine"]
            report_variants.append(entry | ({"arch": arch, "set": set_name} if sweep else {}))
            report_inputs[f"bench_{bench['variant']}"] = bench
    nodes.append(_node(JOIN, JOIN, ReportConfig(
        name=spec.name, accuracy_budget=b.accuracy_budget, batch_sizes=b.batch_sizes, variants=report_variants,
    ), report_inputs))
    return nodes


def _arch_nodes(spec: PipelineSpec, sources: dict[str, Any], ingest: dict, arch: str,
                sweep: bool) -> tuple[list[dict], list[tuple[dict, str | None]]]:
    """One arch's nodes, in dependency order: finetune, calibrations, sensitivity parts and
    producers, then the benchmarks; and the benchmarks with their variant set (None for fp32).
    In a sweep, ids and variant names end in ``@arch`` (a part's id in ``@arch:i``)."""
    f, q, b = spec.finetune, spec.quantize, spec.benchmark
    at = f"@{arch}" if sweep else ""
    weights = sources.get("weights")
    finetune = _node("finetune", f"finetune{at}", FinetuneConfig(
        arch=arch, weights=weights, epochs=f.epochs, batch_size=f.batch_size, lr=f.lr, momentum=f.momentum,
        weight_decay=f.weight_decay, freeze_backbone=f.freeze_backbone, seed=spec.seed, device=f.device,
        precision=f.precision,
    ), {"data": ingest}, digests={"weights": weights["sha256"]} if weights else None)
    nodes = [finetune]
    bench_cfg = {"batch_sizes": b.batch_sizes, "threads": b.threads, "warmup": b.warmup,
                 "iterations": b.iterations, "backend": q.backend}  # BenchmarkConfig's shared fields
    onnx = [r for r in b.runtimes if r != "torchscript"]  # the runtimes that run the ONNX exports (fp32, static)
    benches = [(_node("benchmark", f"benchmark:fp32{at}", BenchmarkConfig(variant="fp32", method="fp32", **bench_cfg,
                                                                          runtimes=onnx),
                      {"data": ingest, "model": finetune}, variant=f"fp32{at}"), None)]
    sets = spec.variant_sets()
    variants = [(v, set_name) for set_name, vs in sets.items() for v in vs]
    calibrations: dict[str, dict] = {}
    for v, _ in variants:
        if v.CALIBRATED:
            cid = calibration_id(v)
            if cid not in calibrations:
                calibrations[cid] = _node("calibrate", f"{cid}{at}", CalibrateConfig(
                    observer=CALIBRATION_STATISTIC[v.observer], backend=q.backend, arch=arch, seed=spec.seed,
                ), {"data": ingest, "model": finetune}, variant=None)
                nodes.append(calibrations[cid])
    for v, set_name in variants:
        name = f"{v.name}{at}"
        if v.PRODUCER == "qat":
            producer = _node("qat", f"qat:{name}", QatConfig(
                variant=v.name, arch=arch, backend=q.backend, epochs=v.epochs, lr=v.lr,
                batch_size=v.batch_size or f.batch_size, momentum=f.momentum, seed=spec.seed, device=f.device,
                export_onnx=v.EXPORTS_ONNX and bool(onnx),
            ), {"data": ingest, "model": finetune}, variant=name)
        else:
            inputs = {"data": ingest, "model": finetune}
            config: dict[str, Any] = {}
            if v.CALIBRATED:
                inputs["calibration"] = calibrations[calibration_id(v)]
            if v.sensitivity:
                parts = [_node("sensitivity", f"sensitivity:{name}:{i}",
                               sensitivity_config(v, q.backend, arch, i, q.sensitivity_parts), dict(inputs),
                               variant=name) for i in range(q.sensitivity_parts)]
                nodes.extend(parts)
                inputs |= {f"sensitivity_{i}": part for i, part in enumerate(parts)}
                config["sensitivity"] = q.sensitivity_parts
            if v.fallback in ("auto", "latency"):
                config |= {"fallback": v.fallback, "accuracy_budget": b.accuracy_budget}
            producer = _node("quantize", f"quantize:{name}", QuantizeConfig(
                variant=v.name, method=v.method, observer=v.observer, per_channel=v.per_channel, backend=q.backend,
                arch=arch, percentile=v.percentile, activations=activations(v), bias_correction=v.bias_correction,
                export_onnx=v.EXPORTS_ONNX and bool(onnx), **v.engine_options(), **config), inputs, variant=name)
        nodes.append(producer)
        runtimes = v.measured_on(onnx)
        benches.append((_node("benchmark", f"benchmark:{name}",
                              BenchmarkConfig(variant=v.name, method=v.method, **bench_cfg, runtimes=runtimes,
                                              engine=v.ENGINE),
                              {"data": ingest, "model": producer}, variant=name), set_name))
    nodes.extend(bench for bench, _ in benches)
    return nodes, benches


def children(plan: list[dict]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {n["id"]: [] for n in plan}
    for n in plan:
        for dep in n["inputs"].values():
            out[dep["id"]].append(n["id"])
    return out
