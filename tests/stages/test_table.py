"""Contract tests over the stage registry and the plan, the quantization engine on real
torchvision models (random weights, 32x32 inputs, 4 classes) and the report's selection.
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
import torch
import yaml

import pipeline.stages as stages
from pipeline.errors import StageError
from pipeline.hashing import canonical_json, sha256_bytes
from pipeline.models import build_model
from pipeline.plan import build_plan, children
from pipeline.quant import (
    OBSERVER_KEY,
    convert_static,
    count_layers,
    export_torchscript,
    layer_table,
    observer_state,
    prepare_static,
    quantize_dynamic,
    quiet,
)
from pipeline.report import choose_runtimes, per_batch, select
from pipeline.runner import prepare_sources
from pipeline.spec import load_spec, parse_spec
from pipeline.stages.configs import StageConfig
from pipeline.stages.table import declare
from pipeline.store import FileStore
from tests.conftest import SMALL_SPEC, plan_of
from workers import metrics
from workers.app import QUEUES, STAGE_QUEUES, app

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "digits.yaml"
EXAMPLE_DICT = yaml.safe_load(EXAMPLE.read_text())
STAGES = stages.STAGES


pytestmark = pytest.mark.usefixtures("one_thread")


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
EXAMPLE_KEYS = {
    "ingest": "beff7e89acb2c2eb16885fb5c15c75c1",
    "finetune": "1c7a119f2ae3f331b77131196a36f87e",
    "calibrate:minmax": "5be2938b5601ac9b19a787124c1e214e",
    "calibrate:histogram": "dcd390467c5f834830285a98b3fa5830",
    "sensitivity:ptq-minmax:0": "d30dc195c72446ca4600af5747400b08",
    "sensitivity:ptq-minmax:1": "bbaac093bf30b46eea0258678cb337ec",
    "sensitivity:ptq-minmax:2": "1a840cdefbb9553163b4a9327b04b1ea",
    "sensitivity:ptq-minmax:3": "84615e97a3bb1c36754d659dbfccc774",
    "quantize:ptq-minmax": "8dc75e25e445210444bf69c50a4617d0",
    "quantize:ptq-histogram": "80a5a7b30d722d377cc1c28cdc6ca6cc",
    "quantize:dynamic": "99f98fb8808bf9bd1f9eceb60984bc6a",
    "qat:qat": "6a69e4b76717e401ab77da81d87b90b2",
    "benchmark:fp32": "8de507e2155c3037bdd6f64973254d33",  # moved: fp32 also runs on the ONNX runtimes
    "benchmark:ptq-minmax": "e3e6147a98a68f274137bd3b2c0867d3",
    "benchmark:ptq-histogram": "8e0f5c1ed1b53af52a69b13fac169745",
    "benchmark:dynamic": "7c3f3bc8628dd1be1252b3edb7c56ea0",
    "benchmark:qat": "61a8fc6a3738e8118415f19c4e4ef224",
    "report": "3457c5aa0b68db439dba262a5b6a1531",  # moved with benchmark:fp32, its input
}
SMALL_KEYS = {
    "ingest": "8e2095dd6c6bef03acd86a89c68858a2",
    "finetune": "0f46907e8203b999914574610d83cbff",
    "calibrate:minmax": "15c4c1d1e79e0e2bbf80662a86ab0dfd",
    "calibrate:histogram": "e5ec590f918ef05359fad6aa740dae7a",
    "quantize:ptq-minmax": "62430acfda96ce393bec234d17059c3e",
    "quantize:ptq-histogram": "2ccb3b0d34fbeffc5afba12a88ac70f9",
    "quantize:dynamic": "641f1697cdc6aab08d9a6db69b975ac9",
    "qat:qat": "1d2f00f83e22156aa58ed2976aa57b14",
    "benchmark:fp32": "2a2d0d65211b429d5512d1d0cbed1562",
    "benchmark:ptq-minmax": "6f39d805e68f1f35146402805048e0a7",
    "benchmark:ptq-histogram": "6b9f348b79377b52a643015356fe5f43",
    "benchmark:dynamic": "c6f5ee3383b1186f0c85b67174db3628",
    "benchmark:qat": "cf80a8d12e97b0531104b452fe511c9a",
    "report": "63ed97e83aab395a91426f92036205de",
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
    assert sha256_bytes(canonical_json(sweep).encode()) == \
        "5f82ad2d9f5e34be12eb8e9524d5fdeb32aa8b6e3a7d335ab54be13f179c232a"


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


# ----------------------------------------------------------------------- quantization engine

NUM_CLASSES = 4
EXAMPLE_INPUT = (torch.zeros(1, 3, 32, 32),)
# arch -> (static int8, static fp32), (dynamic int8, dynamic fp32) conv/linear layers
EXPECTED_LAYERS = {"resnet18": ((21, 0), (1, 20)), "mobilenet_v2": ((53, 0), (1, 52))}


def calibration_batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 32, 32, generator=g) for _ in range(n)]


def calibrated(model: torch.nn.Module, arch: str, observer: str) -> torch.nn.Module:
    observed = prepare_static(model, EXAMPLE_INPUT, observer=observer, per_channel=True, backend="x86", arch=arch)
    with torch.no_grad():
        for x in calibration_batches():
            observed(x)
    return observed


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Per arch: the fp32 model, its calibrated observed copy, the stored calibration (through
    torch.save / torch.load(weights_only=True), as between the calibrate and quantize stages),
    and the static and dynamic int8 models."""
    folder = tmp_path_factory.mktemp("engine")
    out = {}
    for arch in sorted(EXPECTED_LAYERS):
        torch.manual_seed(0)
        fp32 = build_model(arch, NUM_CLASSES).eval()
        observed = calibrated(fp32, arch, "minmax")
        torch.save(observer_state(observed), folder / f"{arch}-observers.pt")
        stored = torch.load(folder / f"{arch}-observers.pt", weights_only=True)
        static = convert_static(copy.deepcopy(fp32), EXAMPLE_INPUT, stored, observer="minmax", per_channel=True,
                                backend="x86", arch=arch)
        dynamic = quantize_dynamic(fp32, EXAMPLE_INPUT, backend="x86", arch=arch)
        out[arch] = {"fp32": fp32, "observed": observed, "stored": stored, "static": static, "dynamic": dynamic}
    return out


ARCHS = sorted(EXPECTED_LAYERS)


@pytest.mark.parametrize("arch", ARCHS)
def test_static_convert_makes_every_conv_and_linear_int8(engine: dict, arch: str) -> None:
    rows = layer_table(engine[arch]["static"])
    assert count_layers(rows) == EXPECTED_LAYERS[arch][0]
    assert {r["precision"] for r in rows} == {"int8"}
    fp32_rows = layer_table(engine[arch]["fp32"])
    assert {r["precision"] for r in fp32_rows} == {"fp32"} and len(fp32_rows) == len(rows)


@pytest.mark.parametrize("arch", ARCHS)
def test_dynamic_leaves_convolutions_fp32(engine: dict, arch: str) -> None:
    rows = layer_table(engine[arch]["dynamic"])
    assert count_layers(rows) == EXPECTED_LAYERS[arch][1]
    for r in rows:
        if r["type"] == "Linear":
            assert r["precision"] == "int8-dynamic"
        else:
            assert r["type"] == "Conv2d" and r["precision"] == "fp32"


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_models_stay_close_to_fp32(engine: dict, arch: str) -> None:
    x = calibration_batches(1)[0]
    with torch.no_grad():
        ref = engine[arch]["fp32"](x)
        for kind in ("static", "dynamic"):
            out = engine[arch][kind](x)
            assert out.shape == (8, NUM_CLASSES) and out.dtype == torch.float32
            assert torch.isfinite(out).all()
            scale = ref.abs().max().item() + 1e-6
            assert (out - ref).abs().max().item() / scale < 0.5, kind


def test_torchscript_loads_in_plain_torch(engine: dict, tmp_path: Path) -> None:
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    expected = {}
    for arch in ARCHS:
        for kind in ("static", "dynamic"):
            export_torchscript(engine[arch][kind], EXAMPLE_INPUT, tmp_path / f"{arch}-{kind}.ts")
            with torch.no_grad():
                expected[f"{arch}-{kind}"] = engine[arch][kind](x)
    code = textwrap.dedent("""
        import sys, warnings
        warnings.simplefilter("ignore")
        import torch
        folder, names = sys.argv[1], sys.argv[2:]
        x = torch.load(folder + "/x.pt", weights_only=True)
        out = {}
        for name in names:
            model = torch.jit.load(folder + "/" + name + ".ts", map_location="cpu")
            with torch.no_grad():
                out[name] = model(x)
        torch.save(out, folder + "/out.pt")
        leaked = sorted(m for m in sys.modules if m == "pipeline" or m.startswith(("pipeline.", "workers")))
        print("LEAKED", leaked)
    """)
    # run outside the repository so that `pipeline` is not even importable by accident
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), *expected], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LEAKED []" in proc.stdout
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert set(out) == set(expected)
    for name, want in expected.items():
        assert torch.allclose(out[name], want, atol=1e-5), name


def _assert_same_int8(direct: torch.nn.Module, reused: torch.nn.Module) -> None:
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(direct(x), reused(x))
    mine = reused.state_dict()
    qparams = [k for k in direct.state_dict() if k.endswith(("scale", "zero_point"))]
    assert qparams
    for k in qparams:
        assert torch.equal(direct.state_dict()[k], mine[k]), k


@pytest.mark.parametrize("arch", ARCHS)
def test_calibration_reuse_equals_direct_convert(engine: dict, arch: str) -> None:
    """convert_static from a stored observer_state == converting the calibrated model itself."""
    from torch.ao.quantization.quantize_fx import convert_fx

    e = engine[arch]
    assert e["stored"] and all(OBSERVER_KEY in k for k in e["stored"])
    with quiet():
        direct = convert_fx(copy.deepcopy(e["observed"]))
    _assert_same_int8(direct, e["static"])
    # a calibration that does not fit the model is refused, not silently half-loaded
    partial = dict(list(e["stored"].items())[:-1])
    with pytest.raises(StageError, match="recalibrate"):
        convert_static(e["fp32"], EXAMPLE_INPUT, partial, observer="minmax", per_channel=True, backend="x86",
                       arch=arch)


def test_calibration_reuse_with_histogram_observer(engine: dict) -> None:
    from torch.ao.quantization.quantize_fx import convert_fx

    fp32 = engine["resnet18"]["fp32"]
    observed = prepare_static(fp32, EXAMPLE_INPUT, observer="histogram", per_channel=True, backend="x86",
                              arch="resnet18")
    with torch.no_grad():
        observed(calibration_batches(1)[0])
    state = observer_state(observed)
    assert any(k.endswith("histogram") for k in state)
    with quiet():
        direct = convert_fx(copy.deepcopy(observed))
    reused = convert_static(copy.deepcopy(fp32), EXAMPLE_INPUT, state, observer="histogram", per_channel=True,
                            backend="x86", arch="resnet18")
    _assert_same_int8(direct, reused)


# ------------------------------------------------------------------------------- selection

def row(name: str, acc: float, p50: dict[str, float], base: float | None = 0.90) -> dict:
    """A variant row as the report stage makes it: its drop against its own fp32 baseline."""
    drop = None if base is None else base - acc
    return {"name": name, "method": "static", "accuracy_top1": acc, "latency_ms_p50": p50, "accuracy_drop": drop}


def test_select_picks_the_fastest_within_budget() -> None:
    variants = [
        row("slow-ok", 0.90, {"1": 6.0, "32": 40.0}),
        row("fast-ok", 0.895, {"1": 4.0, "32": 50.0}),
        row("fastest-but-inaccurate", 0.70, {"1": 1.0, "32": 10.0}),
        row("exactly-on-budget", 0.89, {"1": 5.0, "32": 30.0}),
    ]
    name, reason = select(variants, 0.01, "1")
    assert name == "fast-ok"
    assert "batch 1" in reason and "3 variant(s)" in reason and "on torchscript" in reason
    name, _ = select(variants, 0.01, "32")  # the batch size picks the latency column
    assert name == "exactly-on-budget"
    name, _ = select(variants, 0.5, "1")
    assert name == "fastest-but-inaccurate"
    better = [row("better", 0.95, {"1": 9.0, "32": 99.0})]  # more accurate than fp32 is within budget
    assert select(better, 0.0, "1")[0] == "better"
    # each row against its own baseline (a sweep): 0.80 is within budget of a 0.805 fp32
    assert select([row("other-arch", 0.80, {"1": 0.5}, base=0.805)] + variants, 0.01, "1")[0] == "other-arch"


def test_select_none_when_all_exceed_the_budget() -> None:
    variants = [row("a", 0.80, {"1": 1.0}), row("b", 0.85, {"1": 2.0}),
                {"name": "failed", "method": "qat", "accuracy_top1": None}]
    name, reason = select(variants, 0.01, "1")
    assert name is None and "budget" in reason
    assert select([], 0.01, "1")[0] is None
    name, reason = select([row("a", 0.80, {"1": 1.0}, base=None)], 1.0, "1")
    assert name is None and "baseline" in reason


def test_each_batch_size_is_served_by_the_fastest_runtime_within_budget() -> None:
    r = row("v", 0.90, {"1": 4.0, "32": 40.0})
    r["latency_ms_p95"], r["throughput_ips"] = {"1": 5.0, "32": 50.0}, {"1": 250.0, "32": 800.0}
    metrics = {"latency_ms_p95": {"1": 1.0, "32": 1.0}, "throughput_ips": {"1": 1.0, "32": 1.0}}
    r["runtimes"] = {"torchscript": {"accuracy_top1": 0.90, "latency_ms_p50": {"1": 4.0, "32": 40.0}, **metrics},
                     "onnxruntime": {"accuracy_top1": 0.90, "latency_ms_p50": {"1": 2.0, "32": 60.0}, **metrics},
                     "openvino": {"accuracy_top1": 0.85, "latency_ms_p50": {"1": 1.0, "32": 10.0}, **metrics}}
    choose_runtimes(r, 0.90, 0.01)  # openvino is fastest but loses 5 points: never chosen
    assert r["runtime"] == {"1": "onnxruntime", "32": "torchscript"}
    assert r["latency_ms_p50"] == {"1": 2.0, "32": 40.0} and r["latency_ms_p95"] == {"1": 1.0, "32": 50.0}
    choose_runtimes(r, 0.90, 0.1)
    assert r["runtime"] == {"1": "openvino", "32": "openvino"}
    picks = per_batch([r], 0.1, [1, 32])
    assert picks == {"1": {"variant": "v", "runtime": "openvino", "latency_ms_p50": 1.0, "accuracy_top1": 0.85},
                     "32": {"variant": "v", "runtime": "openvino", "latency_ms_p50": 10.0, "accuracy_top1": 0.85}}
