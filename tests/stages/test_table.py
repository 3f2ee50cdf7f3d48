"""Contract tests over the stage table (every stage declared once, with its queue, role, config
type and function) and over the plan built from it: node order, configs and content keys.

The stages' own behaviour is tested in the other modules of this package, one per stage.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

import pipeline.stages as stages
from pipeline.errors import StageError
from pipeline.hashing import canonical_json, sha256_bytes
from pipeline.plan import build_plan, children
from pipeline.sources import prepare_sources
from pipeline.spec import load_spec, parse_spec
from pipeline.stages.configs import StageConfig
from pipeline.stages.table import declare
from pipeline.store import FileStore
from tests.helpers import SMALL_SPEC, plan_of
from workers import metrics
from workers.app import QUEUES, STAGE_QUEUES, app

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "digits.yaml"
EXAMPLE_DICT = yaml.safe_load(EXAMPLE.read_text())
STAGES = stages.STAGES


# ----------------------------------------------------------------------------- stage table

def test_table_drives_worker_routing() -> None:
    assert STAGE_QUEUES == {name: d.queue for name, d in STAGES.items()}
    assert app.conf.task_routes == {f"qpipe.{name}": {"queue": d.queue} for name, d in STAGES.items()}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_contract(name: str) -> None:
    sdef = stages.stage_def(name)
    assert sdef.name == name
    assert sdef.queue in QUEUES
    assert isinstance(sdef.version, int) and sdef.version >= 1
    assert isinstance(sdef.config, type) and issubclass(sdef.config, StageConfig)
    assert callable(sdef.fn) and sdef.fn.__module__ == f"pipeline.stages.{name}"  # imported on first use
    # only the join (the report) runs every time and with whatever inputs exist
    assert sdef.role in ("step", "join")
    assert sdef.cached is (sdef.role == "step")
    assert sdef.partial_inputs is (sdef.role == "join")
    assert (sdef.role == "join") is (name == "report") and stages.is_join(name) is (name == "report")


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_stage_has_its_own_metrics_label(name: str) -> None:
    """A stage missing from the metrics labels is recorded as stage="other" (sensitivity once was)."""
    assert metrics.stage_label(name) == name
    attempt = metrics.StageAttempt(name, cacheable=STAGES[name].cached)
    assert attempt.stage == name


def test_declare_refuses_a_bad_table() -> None:
    one = STAGES["ingest"]
    with pytest.raises(ValueError, match="declared twice"):
        declare(one, replace(one, version=99))
    with pytest.raises(ValueError, match="queue must be cpu or gpu"):
        declare(replace(one, queue="tpu"))
    with pytest.raises(ValueError, match="role must be step or join"):
        declare(replace(one, role="fan"))
    with pytest.raises(ValueError, match="config must be a StageConfig"):
        declare(replace(one, config=dict))
    with pytest.raises(ValueError, match="one join stage"):
        declare(STAGES["report"], replace(STAGES["report"], name="report2"))
    assert STAGES["ingest"].version == 1  # the table itself is untouched
    with pytest.raises(StageError, match="unknown stage"):
        stages.stage_def("no-such-stage")


# builtin:digits with a fixed digest (the real one carries scikit-learn's version), so that the
# keys below depend on the plan's configs alone
PINNED_SOURCES = {"source": {"kind": "builtin", "name": "digits", "sha256": sha256_bytes(b"builtin:digits")},
                  "val_source": None, "weights": None}

LEAN_CHECK = textwrap.dedent("""
    import json, sys
    STAGE_MODULES = [f"pipeline.stages.{name}" for name in
                     ("ingest", "finetune", "calibrate", "sensitivity", "quantize", "qat", "benchmark", "report",
                      "common")]
    def heavy():
        return sorted(m for m in ("torch", "torchvision", "numpy", "PIL", "sklearn", "pipeline.quant", *STAGE_MODULES)
                      if m in sys.modules)
    import workers.app, workers.metrics, pipeline.stages.table
    after_import = heavy()
    # the arch list is torchvision's, checked when the spec is validated; planning needs none of it
    import pipeline.spec
    pipeline.spec.classification_archs = lambda: ["resnet18"]
    from pipeline.plan import build_plan
    plan = build_plan(pipeline.spec.parse_spec(json.loads(sys.argv[1])), json.loads(sys.argv[2]))
    print(json.dumps({"after_import": after_import, "after_plan": heavy(), "nodes": len(plan),
                      "routes": sorted(workers.app.app.conf.task_routes)}))
""")


def test_the_table_and_planning_import_no_torch() -> None:
    """Routing, metrics labels and planning read the stage table only: no torch on the submitting
    machine, no CUDA in a worker's prefork parent."""
    out = subprocess.run([sys.executable, "-c", LEAN_CHECK, json.dumps(SMALL_SPEC), json.dumps(PINNED_SOURCES)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["after_import"] == []
    assert result["after_plan"] == []
    assert result["nodes"] == len(build_plan(parse_spec(SMALL_SPEC), PINNED_SOURCES))
    assert result["routes"] == sorted(f"qpipe.{s}" for s in STAGES)


# Content keys are a stored format: a stage's stored result is found again by its key, so a change
# in how configs are built or serialised must leave every key where it was. These were computed
# before the configs became typed; a key that moves means every stored result is recomputed.
# "v2 stages": calibrate, sensitivity, quantize and qat at version 2 (ReLU6 ranges from the clamped
# values, the symmetric activation scheme keyed, the export's quantizer placement). "benchmark v4":
# the benchmark stores and measures the OpenVINO form as an IR (and reads HardSigmoid as HSigmoid).
EXAMPLE_KEYS = {
    "ingest": "beff7e89acb2c2eb16885fb5c15c75c1",
    "finetune": "1c7a119f2ae3f331b77131196a36f87e",
    "calibrate:minmax": "9a1b8b7aa1ff6075e799f49f5fdf6559",  # moved: v2 stages
    "calibrate:histogram": "7cbe050ab0433e391908d59d39c984de",  # moved: v2 stages
    "sensitivity:ptq-minmax:0": "4eb08c18143594b6c349c45b2b139f97",  # moved: v2 stages
    "sensitivity:ptq-minmax:1": "00ee72190bdafbcb5da573bd90ae4e71",  # moved: v2 stages
    "sensitivity:ptq-minmax:2": "d143326e878c2d0b8c3b1c120e6721e4",  # moved: v2 stages
    "sensitivity:ptq-minmax:3": "86937bd1fd7d91059f17b4c2c13464d9",  # moved: v2 stages
    "quantize:ptq-minmax": "6070bad2e2a63c89edc6e414eaee7d79",  # moved: v2 stages
    "quantize:ptq-histogram": "a13655b85ebc0ea8f13294dd3ae967b2",  # moved: v2 stages
    "quantize:dynamic": "7d8fa6941f91831611a7234b1dacdfa0",  # moved: v2 stages
    "qat:qat": "f730679ee8a64c9bace3f50cb4e367c2",  # moved: v2 stages
    "benchmark:fp32": "ee937bf68b5a546c7cfc312887fd396a",  # moved: benchmark v4
    "benchmark:ptq-minmax": "7b9ef06bc75a7058a7f9635e52edcfe8",  # moved: benchmark v4
    "benchmark:ptq-histogram": "a8d06ed88160105309a772a834d2a6d8",  # moved: benchmark v4
    "benchmark:dynamic": "61d1c8cc553a4bcc6f27b6d135d6562e",  # moved: benchmark v4
    "benchmark:qat": "3cdf9f7b6b9b60ef99a55236799b3100",  # moved: benchmark v4
    "report": "8b1b5c3f76cc4c7502c156314c39e4e0",  # moved: benchmark v4
}
SMALL_KEYS = {
    "ingest": "8e2095dd6c6bef03acd86a89c68858a2",
    "finetune": "0f46907e8203b999914574610d83cbff",
    "calibrate:minmax": "6c83c0e13faf242279e76201bbd69d30",  # moved: v2 stages
    "calibrate:histogram": "1abfd05a9f6b7ced4debaf3c3f792350",  # moved: v2 stages
    "quantize:ptq-minmax": "b4196a6e30701da034aa2a18b067f35a",  # moved: v2 stages
    "quantize:ptq-histogram": "3122555f41faddf690b394033ce212e6",  # moved: v2 stages
    "quantize:dynamic": "96dc274ac414aef817cfdcb7f99c7ee7",  # moved: v2 stages
    "qat:qat": "73911ca6bd584082360da3cb73dc8ab8",  # moved: v2 stages
    "benchmark:fp32": "5c3428686d909f0a83cfcb092ec88d55",  # moved: benchmark v4
    "benchmark:ptq-minmax": "7eb8cc816dde17ff5879b1614f04473c",  # moved: benchmark v4
    "benchmark:ptq-histogram": "1e08ca49c5b33f24c7df6a1515dcadd9",  # moved: benchmark v4
    "benchmark:dynamic": "443357aa19de011b584e8fe70e1214b5",  # moved: benchmark v4
    "benchmark:qat": "e1fad2d0f7e6248a4a9a2038f3af5fe8",  # moved: benchmark v4
    "report": "025fa28a3050bb37b105a5d277c9111a",  # moved: benchmark v4
}


def every_option_sweep() -> dict:
    """A sweep that sets every option a config leaves out at its default (precision, percentile,
    bias correction, sensitivity, fallback, ONNX runtimes, a QAT batch size)."""
    spec = copy.deepcopy(SMALL_SPEC)
    spec["finetune"] |= {"precision": "bf16", "freeze_backbone": True}
    spec["quantize"] = {"backend": "qnnpack", "sensitivity_parts": 2}
    spec["benchmark"]["runtimes"] = ["torchscript", "onnxruntime"]
    spec["sweep"] = {"archs": ["resnet18", "mobilenet_v2"], "variant_sets": {
        "a": [{"name": "p", "method": "static", "observer": "percentile", "percentile": 99.9, "bias_correction": True},
              {"name": "e", "method": "static", "observer": "entropy", "per_channel": False, "sensitivity": True}],
        "b": [{"name": "q", "method": "qat", "batch_size": 16}, {"name": "d", "method": "dynamic"},
              {"name": "f", "method": "static", "fallback": "auto"}]}}
    return spec


def test_content_keys_are_unchanged() -> None:
    assert keys(build_plan(parse_spec(EXAMPLE_DICT), PINNED_SOURCES)) == EXAMPLE_KEYS
    assert keys(build_plan(parse_spec(SMALL_SPEC), PINNED_SOURCES)) == SMALL_KEYS
    sweep = keys(build_plan(parse_spec(every_option_sweep()), PINNED_SOURCES))
    assert len(sweep) == 36
    # moved with the benchmarks and the report: benchmark v4
    assert sha256_bytes(canonical_json(sweep).encode()) == \
        "0edeed738d49126309ce83577ee8fea07ac4ae2380b94952564c8a88e524f904"


def test_every_node_config_parses_into_its_stage_type() -> None:
    """What the plan sends is what the stage parses back: the node's JSON, read into the stage's
    config type and written out again, is unchanged; a node whose config does not fit is refused."""
    plans = [build_plan(parse_spec(s), PINNED_SOURCES) for s in (EXAMPLE_DICT, every_option_sweep())]
    seen = set()
    for node in (n for plan in plans for n in plan):
        cfg = STAGES[node["stage"]].config.parse(node["config"])
        assert type(cfg) is STAGES[node["stage"]].config
        assert cfg.to_json() == node["config"], node["id"]
        seen.add(node["stage"])
    assert seen == set(STAGES)
    node = next(n for n in plans[0] if n["stage"] == "quantize")
    with pytest.raises(StageError, match="QuantizeConfig"):
        STAGES["quantize"].config.parse({**node["config"], "observr": "minmax"})


# ----------------------------------------------------------------------------------- plans



def keys(plan: list[dict]) -> dict[str, str]:
    return {n["id"]: n["key"] for n in plan}


def test_plan_of_example(plan_store: FileStore) -> None:
    plan = build_plan(load_spec(EXAMPLE), prepare_sources(load_spec(EXAMPLE), plan_store))
    ids = [n["id"] for n in plan]
    assert len(ids) == len(set(ids))
    assert len({n["key"] for n in plan}) == len(plan)  # distinct nodes, distinct addresses
    seen: set[str] = set()
    for n in plan:  # dependency order, and each node on its stage's queue
        assert all(dep["id"] in seen for dep in n["inputs"].values()), n["id"]
        assert all(dep["key"] == keys(plan)[dep["id"]] for dep in n["inputs"].values())
        assert n["queue"] == STAGE_QUEUES[n["stage"]]
        json.dumps(n)  # a node is plain JSON: it travels in a task message
        seen.add(n["id"])
    assert {n["stage"] for n in plan} == set(STAGES)  # the example exercises every stage
    calibrations = [n for n in plan if n["stage"] == "calibrate"]
    assert sorted(n["config"]["observer"] for n in calibrations) == ["histogram", "minmax"]
    assert ids[-1] == "report" and children(plan)["report"] == []
    assert set(children(plan)["ingest"]) == set(ids) - {"ingest"}  # every stage reads the dataset


def test_one_calibration_per_distinct_observer(plan_store: FileStore) -> None:
    spec = copy.deepcopy(EXAMPLE_DICT)
    spec["quantize"]["variants"] = [
        {"name": "h1", "method": "static", "observer": "histogram"},
        {"name": "h2", "method": "static", "observer": "histogram", "per_channel": False},
        {"name": "h3", "method": "static"},  # histogram by default
        {"name": "m1", "method": "static", "observer": "minmax"},
        {"name": "ma", "method": "static", "observer": "moving_average_minmax"},
        {"name": "d", "method": "dynamic"},
    ]
    plan = plan_of(spec, plan_store)
    cal = {n["id"]: n for n in plan if n["stage"] == "calibrate"}
    assert sorted(cal) == ["calibrate:histogram", "calibrate:minmax", "calibrate:moving_average_minmax"]
    by_id = {n["id"]: n for n in plan}
    for v, observer in (("h1", "histogram"), ("h2", "histogram"), ("h3", "histogram"), ("m1", "minmax")):
        dep = by_id[f"quantize:{v}"]["inputs"]["calibration"]
        assert dep["id"] == f"calibrate:{observer}" and dep["key"] == cal[dep["id"]]["key"]
    assert "calibration" not in by_id["quantize:d"]["inputs"]
    # variants differing only in per_channel share a calibration but not a quantized model
    assert by_id["quantize:h1"]["key"] != by_id["quantize:h2"]["key"]


def test_plan_keys_are_deterministic(plan_store: FileStore) -> None:
    first = plan_of(copy.deepcopy(EXAMPLE_DICT), plan_store)
    second = plan_of(copy.deepcopy(EXAMPLE_DICT), plan_store)
    assert keys(first) == keys(second)
    reordered = {k: EXAMPLE_DICT[k] for k in reversed(list(EXAMPLE_DICT))}  # key order is irrelevant
    assert keys(plan_of(reordered, plan_store)) == keys(first)


def _with(path: str, value: object) -> dict:
    spec = copy.deepcopy(EXAMPLE_DICT)
    *parents, leaf = path.split(".")
    node = spec
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    node[leaf] = value
    return spec


# (dotted path in the spec, new value, the node ids whose key must NOT change)
SENSITIVITY = {f"sensitivity:ptq-minmax:{i}" for i in range(4)}  # ptq-minmax's parts (fallback: auto)
CHANGES = [
    ("seed", 1, set()),
    ("data.image_size", 32, set()),
    ("data.val_fraction", 0.25, set()),
    ("model.arch", "mobilenet_v2", {"ingest"}),
    ("finetune.lr", 0.02, {"ingest"}),
    ("finetune.epochs", 4, {"ingest"}),
    ("quantize.variants.0.per_channel", False,  # same calibration, another int8 model
     {"ingest", "finetune", "calibrate:minmax", "calibrate:histogram", "quantize:ptq-histogram",
      "benchmark:ptq-histogram", "quantize:dynamic", "benchmark:dynamic", "qat:qat", "benchmark:qat",
      "benchmark:fp32"}),
    ("quantize.variants.3.lr", 0.002,
     {"ingest", "finetune", "calibrate:minmax", "calibrate:histogram", "quantize:ptq-minmax",
      "quantize:ptq-histogram", "quantize:dynamic", "benchmark:fp32", "benchmark:ptq-minmax",
      "benchmark:ptq-histogram", "benchmark:dynamic"} | SENSITIVITY),
    ("benchmark.iterations", 7,
     {"ingest", "finetune", "calibrate:minmax", "calibrate:histogram", "quantize:ptq-minmax",
      "quantize:ptq-histogram", "quantize:dynamic", "qat:qat"} | SENSITIVITY),
    # the budget is a selection setting, and the fallback's target: ptq-minmax searches again
    ("benchmark.accuracy_budget", 0.5, {
        "ingest", "finetune", "calibrate:minmax", "calibrate:histogram",
        "quantize:ptq-histogram", "quantize:dynamic", "qat:qat", "benchmark:fp32",
        "benchmark:ptq-histogram", "benchmark:dynamic", "benchmark:qat"} | SENSITIVITY),
]


@pytest.mark.parametrize(("path", "value", "unchanged"), [pytest.param(*c, id=c[0]) for c in CHANGES])
def test_plan_keys_follow_config(plan_store: FileStore, path: str, value: object, unchanged: set[str]) -> None:
    base = keys(plan_of(copy.deepcopy(EXAMPLE_DICT), plan_store))
    changed = keys(plan_of(_with(path, value), plan_store))
    assert set(changed) == set(base)
    same = {i for i in base if base[i] == changed[i]}
    assert same == unchanged
    assert changed["report"] != base["report"]  # every change reaches the report


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_device_does_not_change_any_key(plan_store: FileStore, device: str) -> None:
    from pipeline.stages.configs import FinetuneConfig, QatConfig

    assert FinetuneConfig.UNKEYED == QatConfig.UNKEYED == {"device"}
    base = plan_of(copy.deepcopy(EXAMPLE_DICT), plan_store)
    moved = plan_of(_with("finetune.device", device), plan_store)
    assert keys(moved) == keys(base)
    by_id = {n["id"]: n for n in moved}
    assert by_id["finetune"]["config"]["device"] == device  # still sent to the worker
    assert by_id["qat:qat"]["config"]["device"] == device


def test_source_digest_enters_the_ingest_key(tmp_path: Path, plan_store: FileStore) -> None:
    from PIL import Image

    folder = tmp_path / "ds"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        Image.new("RGB", (8, 8), (len(c), 0, 0)).save(folder / c / "x.png")
    spec = _with("data.source", str(folder))
    first = keys(plan_of(spec, plan_store))
    Image.new("RGB", (8, 8), (9, 9, 9)).save(folder / "b" / "x.png")
    second = keys(plan_of(spec, plan_store))
    assert first["ingest"] != second["ingest"]
    assert first != keys(plan_of(copy.deepcopy(EXAMPLE_DICT), plan_store))
