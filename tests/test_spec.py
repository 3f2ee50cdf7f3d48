"""The spec is validated once, at the edge: every refusal is a SpecError naming the field.

A table of refused specs (each a small edit of a valid base spec), the refusals of spec files
(bad YAML, missing file), and the specs that are accepted with their defaults filled in.
"""

from __future__ import annotations

import copy
import time
import typing
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from pipeline.errors import ConfigError, SpecError
from pipeline.spec import DynamicVariant, QatVariant, StaticVariant, load_spec, parse_spec, spec_digest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "digits.yaml"

BASE: dict = {
    "name": "spec-test",
    "data": {"source": "builtin:digits", "image_size": 32},
    "model": {"arch": "resnet18"},
    "finetune": {"epochs": 1},
    "quantize": {"variants": [
        {"name": "ptq", "method": "static", "observer": "minmax"},
        {"name": "dyn", "method": "dynamic"},
        {"name": "qat", "method": "qat"},
    ]},
    "benchmark": {"batch_sizes": [1, 8]},
}


def edited(edit: Callable[[dict], object]) -> dict:
    spec = copy.deepcopy(BASE)
    edit(spec)
    return spec


def variant(i: int, **changes: object) -> Callable[[dict], object]:
    return lambda s: s["quantize"]["variants"][i].update(changes)


def section(name: str, **changes: object) -> Callable[[dict], object]:
    return lambda s: s.setdefault(name, {}).update(changes)


# (id, edit of BASE, substrings that the refusal must contain: the field first)
REFUSED = [
    ("unknown-top-level-key", lambda s: s.update(epochs=3), ["epochs", "unknown key"]),
    ("unknown-data-key", section("data", imagesize=32), ["data.imagesize", "unknown key"]),
    ("unknown-finetune-key", section("finetune", learning_rate=0.1), ["finetune.learning_rate", "unknown key"]),
    ("unknown-variant-key", variant(1, bits=4), ["quantize.variants.1.bits", "unknown key"]),
    ("unknown-benchmark-key", section("benchmark", batch=1), ["benchmark.batch", "unknown key"]),
    ("zero-epochs", section("finetune", epochs=0), ["finetune.epochs"]),
    ("negative-epochs", section("finetune", epochs=-2), ["finetune.epochs"]),
    ("fractional-epochs", section("finetune", epochs=1.5), ["finetune.epochs"]),
    ("zero-qat-epochs", variant(2, epochs=0), ["quantize.variants.2.epochs"]),
    ("unknown-arch", section("model", arch="resnt18"), ["model.arch", "resnt18", "did you mean", "resnet18"]),
    ("unknown-arch-far", section("model", arch="zzzqqq"), ["model.arch", "zzzqqq", "list_models"]),
    ("unknown-weights", section("model", weights="IMAGENET1K_V9"),
     ["model", "weights", "IMAGENET1K_V9", "IMAGENET1K_V1"]),
    ("run-name-slash", lambda s: s.update(name="a/b"), ["name", "a/b", "'/'"]),
    ("run-name-dotdot", lambda s: s.update(name="a..b"), ["name", "'..'"]),
    ("run-name-only-dots", lambda s: s.update(name=".."), ["name", "'..'"]),
    ("run-name-empty", lambda s: s.update(name=""), ["name"]),
    ("run-name-missing", lambda s: s.pop("name"), ["name", "missing"]),
    ("variant-name-slash", variant(0, name="x/y"), ["quantize.variants.0.name", "x/y"]),
    ("duplicate-variant-names", variant(1, name="ptq"), ["quantize.variants", "ptq", "twice"]),
    ("observer-on-dynamic", variant(1, observer="minmax"), ["quantize.variants.1", "observer", "dynamic"]),
    ("observer-on-qat", variant(2, observer="histogram"), ["quantize.variants.2", "observer", "qat"]),
    ("unknown-observer", variant(0, observer="percentil"), ["quantize.variants.0.observer", "percentile", "mse"]),
    ("percentile-without-its-observer", variant(0, percentile=99.9),
     ["quantize.variants.0", "percentile", "minmax", "set observer: percentile"]),
    ("percentile-on-dynamic", variant(1, percentile=99.9), ["quantize.variants.1", "percentile"]),
    ("percentile-too-low", variant(0, observer="percentile", percentile=50), ["quantize.variants.0.percentile", "50"]),
    ("percentile-over-100", variant(0, observer="percentile", percentile=100.5),
     ["quantize.variants.0.percentile", "100"]),
    ("percentile-not-a-number", variant(0, observer="percentile", percentile="high"),
     ["quantize.variants.0.percentile"]),
    ("bias-correction-on-dynamic", variant(1, bias_correction=True),
     ["quantize.variants.1", "bias_correction", "static", "dynamic"]),
    ("bias-correction-on-qat", variant(2, bias_correction=True), ["quantize.variants.2", "bias_correction", "qat"]),
    ("bias-correction-not-a-bool", variant(0, bias_correction="maybe"), ["quantize.variants.0.bias_correction"]),
    ("epochs-on-static", variant(0, epochs=2), ["quantize.variants.0", "epochs", "static"]),
    ("lr-on-dynamic", variant(1, lr=0.1), ["quantize.variants.1", "lr", "dynamic"]),
    ("variant-named-fp32", variant(1, name="fp32"), ["quantize.variants.1.name", "fp32"]),
    ("unknown-method", variant(1, method="int4"), ["quantize.variants.1.method"]),
    ("benchmark-batch-zero", section("benchmark", batch_sizes=[0, 8]), ["benchmark.batch_sizes"]),
    ("benchmark-batch-negative", section("benchmark", batch_sizes=[-1]), ["benchmark.batch_sizes"]),
    ("benchmark-batch-huge", section("benchmark", batch_sizes=[5000]), ["benchmark.batch_sizes"]),
    ("benchmark-batch-duplicate", section("benchmark", batch_sizes=[8, 8]), ["benchmark.batch_sizes", "unique"]),
    ("benchmark-batch-empty", section("benchmark", batch_sizes=[]), ["benchmark.batch_sizes"]),
    ("finetune-batch-zero", section("finetune", batch_size=0), ["finetune.batch_size"]),
    ("qat-batch-zero", variant(2, batch_size=0), ["quantize.variants.2.batch_size"]),
    ("val-fraction-zero", section("data", val_fraction=0.0), ["data.val_fraction"]),
    ("val-fraction-one", section("data", val_fraction=1.0), ["data.val_fraction"]),
    ("val-fraction-negative", section("data", val_fraction=-0.1), ["data.val_fraction"]),
    ("val-fraction-above-one", section("data", val_fraction=1.5), ["data.val_fraction"]),
    ("source-http-scheme", section("data", source="http://example.com/d.tar"),
     ["data.source", "http://example.com/d.tar", "scheme"]),
    ("val-source-ftp-scheme", section("data", val_source="ftp://host/d.zip"), ["data.val_source", "scheme"]),
    ("source-unknown-builtin", section("data", source="builtin:mnist"), ["data.source", "builtin:mnist"]),
    ("source-blank", section("data", source="  "), ["data.source", "empty"]),
    ("image-size-too-small", section("data", image_size=8), ["data.image_size"]),
    ("missing-quantize", lambda s: s.pop("quantize"), ["quantize", "missing"]),
    ("no-variants", lambda s: s["quantize"].update(variants=[]), ["quantize.variants"]),
    ("unknown-backend", lambda s: s["quantize"].update(backend="fbgemm2"), ["quantize.backend"]),
    ("dynamic-per-tensor", variant(1, per_channel=False), ["quantize.variants.1", "per_channel"]),
    ("qat-per-tensor", variant(2, per_channel=False), ["quantize.variants.2", "per_channel", "static"]),
]


@pytest.mark.parametrize(("edit", "expected"), [pytest.param(e, x, id=i) for i, e, x in REFUSED])
def test_refused_spec_names_the_field(edit: Callable[[dict], object], expected: list[str]) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(edited(edit))
    err = info.value
    assert isinstance(err, ConfigError)  # never retried
    text = str(err)
    for part in expected:
        assert part in text, f"{part!r} not in {text!r}"
    # the field comes first on its problem line, so the user sees where to look
    field = expected[0]
    assert any(p.startswith(field) for p in err.problems), err.problems


def test_several_problems_are_reported_together() -> None:
    spec = edited(lambda s: (s["finetune"].update(epochs=0), s["data"].update(val_fraction=2.0)))
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    fields = {p.split(":", 1)[0] for p in info.value.problems}
    assert {"finetune.epochs", "data.val_fraction"} <= fields


# ------------------------------------------------------------------------------ upper bounds

# (a field, a value over its bound, the allowed range the refusal must state)
OVER_BOUNDS = [
    ("seed", 2**40, "0 <= seed <= 2147483647"),
    ("data.val_fraction", 1.5, "0.0 < data.val_fraction < 1.0"),
    ("data.image_size", 10**5, "16 <= data.image_size <= 1024"),
    ("data.calib_size", 10**9, "1 <= data.calib_size <= 100000"),
    ("data.max_image_pixels", 10**12, "1 <= data.max_image_pixels <= 1000000000"),
    ("data.max_archive_bytes", 2**50, "1 <= data.max_archive_bytes <= 1099511627776"),
    ("finetune.epochs", 10**9, "1 <= finetune.epochs <= 1000"),
    ("finetune.batch_size", 10**6, "1 <= finetune.batch_size <= 4096"),
    ("finetune.lr", 1e3, "0.0 < finetune.lr <= 10.0"),
    ("finetune.momentum", 1.0, "0.0 <= finetune.momentum < 1.0"),
    ("finetune.weight_decay", 2.0, "0.0 <= finetune.weight_decay <= 1.0"),
    ("quantize.variants.2.epochs", 10**9, "1 <= quantize.variants.2.epochs <= 1000"),
    ("quantize.variants.2.lr", 1e3, "0.0 < quantize.variants.2.lr <= 10.0"),
    ("quantize.variants.2.batch_size", 10**6, "1 <= quantize.variants.2.batch_size <= 4096"),
    ("quantize.sensitivity_parts", 10**6, "1 <= quantize.sensitivity_parts <= 256"),
    ("benchmark.threads", 10**6, "1 <= benchmark.threads <= 256"),
    ("benchmark.accuracy_budget", 2.0, "0.0 <= benchmark.accuracy_budget <= 1.0"),
    ("benchmark.warmup", 10**9, "0 <= benchmark.warmup <= 1000"),
    ("benchmark.iterations", 10**9, "1 <= benchmark.iterations <= 100000"),
]


def _set(spec: dict, path: str, value: object) -> dict:
    *parents, leaf = path.split(".")
    node: object = spec
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})  # type: ignore[union-attr]
    node[leaf] = value  # type: ignore[index]
    return spec


@pytest.mark.parametrize(("path", "value", "allowed"), [pytest.param(*row, id=row[0]) for row in OVER_BOUNDS])
def test_value_over_its_bound_is_refused_naming_field_value_and_range(path: str, value: object, allowed: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(_set(copy.deepcopy(BASE), path, value))
    [problem] = info.value.problems
    assert problem.startswith(f"{path}: ") and f"(got {value!r})" in problem, problem
    assert problem.endswith(f"allowed range: {allowed}"), problem


def test_every_number_in_the_spec_has_an_upper_bound() -> None:
    """A new numeric field without ``le``/``lt`` would let 10**9 epochs through: list them all."""
    from pydantic import BaseModel

    from pipeline import spec as module

    unbounded = []
    for model in [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, BaseModel)]:
        for name, info in model.model_fields.items():
            numeric = info.annotation in (int, float) or (  # int | None; list[int] is checked by a validator
                typing.get_origin(info.annotation) is not list and {int, float} & set(typing.get_args(info.annotation)))
            bounds = {k for c in info.metadata for k in ("le", "lt") if getattr(c, k, None) is not None}
            if numeric and not bounds:
                unbounded.append(f"{model.__name__}.{name}")
    assert unbounded == []
    bounded = {row[0].split(".")[-1] for row in OVER_BOUNDS}
    assert {"epochs", "image_size", "calib_size", "lr", "weight_decay", "iterations"} <= bounded


def test_a_huge_value_is_shown_cut_short() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(edited(section("finetune", epochs=10**500)))
    [problem] = info.value.problems
    assert "..." in problem and len(problem) < 200, problem
    assert problem.endswith("allowed range: 1 <= finetune.epochs <= 1000")


@pytest.mark.parametrize(("edit", "expected"), [
    pytest.param(section("benchmark", batch_sizes=list(range(1, 18))),
                 ["benchmark.batch_sizes", "at most 16 items", "not 17"], id="batch-sizes"),
    pytest.param(lambda s: s["quantize"].update(variants=[{"name": f"d{i}", "method": "dynamic"} for i in range(65)]),
                 ["quantize.variants", "at most 64 items", "not 65"], id="variants"),
    pytest.param(lambda s: (s.pop("quantize"), s.update(sweep={"variant_sets": {
        f"s{j}": [{"name": f"d{j}-{i}", "method": "dynamic"} for i in range(13)] for j in range(5)}})),
                 ["sweep.variant_sets", "65 variants, over the limit of 64", "split the sweep"], id="variant-sets"),
])
def test_lists_have_a_length_limit(edit: Callable[[dict], object], expected: list[str]) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(edited(edit))
    text = str(info.value)
    assert all(part in text for part in expected), text


@pytest.mark.parametrize("value", [["a", "b"], "just a string", 42, None], ids=["list", "str", "int", "none"])
def test_spec_that_is_not_a_mapping_is_refused(value: object) -> None:
    with pytest.raises(SpecError, match="mapping"):
        parse_spec(value)


# ------------------------------------------------------------------------------ spec files

def test_missing_spec_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value)
    assert "no spec file" in str(info.value)


@pytest.mark.parametrize(
    "content",
    [b"name: [unclosed\n", b"name: x\n  bad: indentation\n", b"name: \xff\xfe\n", b"a: 1\n\tb: 2\n"],
    ids=["unclosed-flow", "bad-indent", "not-utf8", "tab-indent"],
)
def test_bad_yaml_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(content)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "not valid YAML" in str(info.value)
    assert info.value.source == str(path)


def _spec_text(extra: str = "") -> str:
    return yaml.safe_dump(BASE) + extra


def test_small_anchors_and_aliases_still_load(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("name: aliases\n"
                    "finetune: &ft {epochs: 2, batch_size: 8}\n"
                    "quantize:\n  variants:\n"
                    "    - &q {name: q1, method: qat, epochs: 2}\n"
                    "    - {<<: *q, name: q2}\n")
    spec = load_spec(path)
    assert [(v.name, v.method, v.epochs) for v in spec.quantize.variants] == [("q1", "qat", 2), ("q2", "qat", 2)]
    assert spec.finetune.epochs == 2


@pytest.mark.parametrize(("copies", "refused_for_size"), [(98, False), (99, True)], ids=["under", "over"])
def test_the_expanded_size_bound_counts_every_alias(tmp_path: Path, copies: int, refused_for_size: bool) -> None:
    """1001 values (a list of 1000) aliased ``copies`` times: 98 copies stay under 100000 values,
    99 go over; under the bound, the spec is refused only for its unknown keys."""
    path = tmp_path / "spec.yaml"
    path.write_text(_spec_text(f"big: &big [{', '.join(['0'] * 1000)}]\ncopies: [{', '.join(['*big'] * copies)}]\n"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    sized = any("expands to over 100000 values" in p for p in info.value.problems)
    assert sized == refused_for_size, info.value.problems
    if not refused_for_size:
        assert {p.split(":")[0] for p in info.value.problems} == {"big", "copies"}


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("a: &a [x]\n" + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n"
                                          for i in range(9)) + "name: *j\n",
                 ["line 6: the file expands to over 100000 values", "write the values out"], id="billion-laughs"),
    pytest.param("name: &n {a: *n}\n", ["alias *n refers to a node that holds it"], id="loop"),
    pytest.param("name: " + "{a: " * 50_000, ["nested more than 32 levels deep"], id="deep-flow"),
    pytest.param("".join("  " * i + f"k{i}:\n" for i in range(200)), ["line 33: nested more than 32"], id="deep-block"),
    pytest.param("name: !!python/object/apply:os.system [echo]\n",
                 ["line 1: the tag !!python/object/apply:os.system is not allowed", "remove the tag"], id="python-tag"),
    pytest.param("name: x\nseed: !!python/name:os.system ''\n", ["line 2: the tag !!python/name:os.system"],
                 id="python-name"),
    pytest.param("name: !env HOME\n", ["the tag !env is not allowed"], id="custom-tag"),
])
def test_hostile_yaml_is_refused_fast(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    t0 = time.monotonic()
    with pytest.raises(SpecError) as info:
        load_spec(path)
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0, f"took {elapsed:.1f}s"
    [problem] = info.value.problems
    assert all(e in problem for e in expected), problem


def test_plain_tags_are_allowed(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(_spec_text().replace("name: spec-test", "name: !!str spec-test") + "seed: !!int '7'\n")
    assert load_spec(path).seed == 7


def test_oversized_spec_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(_spec_text().encode() + b"#" * (1 << 20))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "over the limit of 1048576 for a spec" in str(info.value)


@pytest.mark.parametrize("content", ["", "- a\n- b\n", "just words\n"], ids=["empty", "list", "scalar"])
def test_yaml_file_that_is_not_a_mapping(tmp_path: Path, content: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(content)
    with pytest.raises(SpecError, match="mapping"):
        load_spec(path)


def test_yaml_file_without_quantize_section(tmp_path: Path) -> None:
    spec = copy.deepcopy(BASE)
    del spec["quantize"]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.problems == ["quantize: required field is missing: add it"]
    assert str(path) in str(info.value)


def test_yaml_file_with_unknown_nested_key(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(EXAMPLE.read_text().replace("  threads: 1\n", "  threads: 1\n  therads: 2\n"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert any(p.startswith("benchmark.therads") for p in info.value.problems)


# ---------------------------------------------------------------------------- accepted specs

def test_example_spec_loads() -> None:
    spec = load_spec(EXAMPLE)
    assert spec.name == "digits-resnet18"
    assert spec.data.source == "builtin:digits"
    assert spec.model.arch == "resnet18"
    assert [(v.name, v.method, v.observer) for v in spec.quantize.variants] == [
        ("ptq-minmax", "static", "minmax"),
        ("ptq-histogram", "static", "histogram"),
        ("dynamic", "dynamic", None),
        ("qat", "qat", None),
    ]
    assert spec.benchmark.batch_sizes == [1, 32]
    # a spec validates the same from its file and from a dict
    assert load_spec(yaml.safe_load(EXAMPLE.read_text())).model_dump() == spec.model_dump()


def test_defaults_are_filled_in() -> None:
    spec = parse_spec({"name": "d", "quantize": {"variants": [
        {"name": "s", "method": "static"},
        {"name": "q", "method": "qat"},
        {"name": "q2", "method": "qat", "epochs": 4, "lr": 0.01},
        {"name": "d", "method": "dynamic"},
    ]}})
    s, q, q2, d = spec.quantize.variants
    assert s.observer == "histogram"
    assert s.per_channel is True
    assert (q.epochs, q.lr, q.observer) == (1, 1e-4, None)
    assert (q2.epochs, q2.lr) == (4, 0.01)
    assert (d.observer, d.epochs, d.lr) == (None, None, None)
    assert spec.data.source == "builtin:digits"
    assert spec.quantize.backend == "x86"
    assert spec.finetune.device == "auto"
    assert spec.benchmark.batch_sizes == [1, 32]
    assert [v.name for v in spec.static_variants()] == ["s"]


def test_variants_are_typed_by_method() -> None:
    """Each method is its own type with its own options; another method's option reads as unset,
    and the spec dumps (and so digests) as it did when one class held every option."""
    spec = load_spec(EXAMPLE)
    assert [type(v) for v in spec.quantize.variants] == [StaticVariant, StaticVariant, DynamicVariant, QatVariant]
    assert [v.PRODUCER for v in spec.quantize.variants] == ["quantize", "quantize", "quantize", "qat"]
    assert [v.CALIBRATED for v in spec.quantize.variants] == [True, True, False, False]
    dynamic = spec.quantize.variants[2]
    assert "observer" not in type(dynamic).model_fields
    assert (dynamic.observer, dynamic.percentile, dynamic.bias_correction, dynamic.fallback) == (None, None, False,
                                                                                                 "none")
    assert spec.model_dump()["quantize"]["variants"][2] == {
        "name": "dynamic", "method": "dynamic", "per_channel": True, "observer": None, "percentile": None,
        "bias_correction": False, "sensitivity": False, "fallback": "none", "epochs": None, "lr": None,
        "batch_size": None}
    # the digest recorded in every benchmark manifest, as computed before the variants were typed
    assert spec_digest(spec) == "ef16035de8b68eced9d71dd02649a788368584ced53bd7f46fc9aa435180fd8b"
    # another method's option at its unset value is accepted, as it always was
    same = parse_spec({"name": "n", "quantize": {"variants": [
        {"name": "d", "method": "dynamic", "observer": None, "bias_correction": False, "fallback": "none"},
        {"name": "q", "method": "qat", "epochs": None, "lr": None}]}})
    assert [type(v) for v in same.quantize.variants] == [DynamicVariant, QatVariant]
    assert (same.quantize.variants[1].epochs, same.quantize.variants[1].lr) == (1, 1e-4)


def test_calibration_options() -> None:
    spec = parse_spec({"name": "c", "quantize": {"variants": [
        {"name": "p", "method": "static", "observer": "percentile"},
        {"name": "p9", "method": "static", "observer": "percentile", "percentile": 99.9, "bias_correction": True},
        {"name": "m", "method": "static", "observer": "mse", "per_channel": False},
        {"name": "e", "method": "static", "observer": "entropy"},
        {"name": "h", "method": "static"},
    ]}})
    p, p9, m, e, h = spec.quantize.variants
    assert (p.observer, p.percentile, p.bias_correction) == ("percentile", 99.99, False)
    assert (p9.percentile, p9.bias_correction) == (99.9, True)
    assert (m.observer, m.per_channel, m.percentile) == ("mse", False, None)
    assert (e.observer, h.observer, h.percentile, h.bias_correction) == ("entropy", "histogram", None, False)


def test_batch_sizes_are_sorted() -> None:
    spec = parse_spec(edited(section("benchmark", batch_sizes=[32, 1, 8])))
    assert spec.benchmark.batch_sizes == [1, 8, 32]


def test_existing_weights_name_is_accepted() -> None:
    spec = parse_spec(edited(section("model", weights="IMAGENET1K_V1")))
    assert spec.model.weights == "IMAGENET1K_V1"


def _write_spec(folder: Path, **data: object) -> Path:
    spec = copy.deepcopy(BASE)
    spec["data"].update(data)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("source", ["images", "sub/images", "./images", "data.tar"])
def test_relative_source_resolves_against_spec_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      source: str) -> None:
    spec_dir = tmp_path / "specs"
    (spec_dir / source).parent.mkdir(parents=True, exist_ok=True)
    if source.endswith(".tar"):
        (spec_dir / source).write_bytes(b"")
    else:
        (spec_dir / source).mkdir(parents=True)
    path = _write_spec(spec_dir, source=source, val_source=source)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the spec's folder counts, not the current one
    spec = load_spec(path)
    expected = str((spec_dir / source).resolve())
    assert spec.data.source == expected
    assert spec.data.val_source == expected
    assert Path(spec.data.source).is_absolute()


def test_uris_and_builtin_are_left_alone(tmp_path: Path) -> None:
    path = _write_spec(tmp_path, source="s3://bucket/data", val_source="file:///srv/val.tar")
    spec = load_spec(path)
    assert spec.data.source == "s3://bucket/data"
    assert spec.data.val_source == "file:///srv/val.tar"
    spec = load_spec(_write_spec(tmp_path, source="builtin:digits"))
    assert spec.data.source == "builtin:digits"


def test_missing_bare_relative_source_still_resolves_against_spec_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    path = _write_spec(spec_dir, source="images")
    cwd = tmp_path / "cwd"
    (cwd / "images").mkdir(parents=True)  # a same-named folder in the current folder must not be used
    monkeypatch.chdir(cwd)
    spec = load_spec(path)
    assert spec.data.source == str(spec_dir / "images")


# ------------------------------------------------------------------------- other engines

def engine_variant(**options: object) -> Callable[[dict], object]:
    """Replace variant 0 (ptq) by a static variant with ``options``."""
    return lambda s: s["quantize"]["variants"].__setitem__(0, {"name": "e", "method": "static", **options})


ENGINE_REFUSED = [
    ("unknown-engine", engine_variant(engine="tensorrt"),
     ["quantize.variants.0.engine", "'qpipe', 'nncf', 'onnxruntime'", "tensorrt"]),
    ("nncf-unknown-preset", engine_variant(engine="nncf", preset="fast"),
     ["quantize.variants.0.preset", "'performance' or 'mixed'"]),
    ("nncf-bias-correction-not-a-bool", engine_variant(engine="nncf", fast_bias_correction="maybe"),
     ["quantize.variants.0.fast_bias_correction"]),
    ("nncf-per-tensor", engine_variant(engine="nncf", per_channel=False),
     ["quantize.variants.0", "engine: nncf", "per_channel"]),
    ("ort-unknown-calibration", engine_variant(engine="onnxruntime", calibrate_method="kl"),
     ["quantize.variants.0.calibrate_method", "'minmax', 'entropy' or 'percentile'"]),
    ("ort-preprocess-not-a-bool", engine_variant(engine="onnxruntime", preprocess="maybe"),
     ["quantize.variants.0.preprocess"]),
    ("observer-on-nncf", engine_variant(engine="nncf", observer="minmax"),
     ["quantize.variants.0", "observer", "engine: nncf", "calibrates the model itself"]),
    ("activations-on-nncf", engine_variant(engine="nncf", activations="asymmetric"),
     ["quantize.variants.0", "activations", "engine: nncf", "calibrates the model itself"]),
    ("activations-on-dynamic", variant(1, activations="asymmetric"),
     ["quantize.variants.1", "activations is an option of method: static", "dynamic"]),
    ("activations-unknown", engine_variant(activations="affine"),
     ["quantize.variants.0.activations", "'symmetric' or 'asymmetric'"]),
    ("fallback-on-ort", engine_variant(engine="onnxruntime", fallback="auto"),
     ["quantize.variants.0", "fallback", "engine: onnxruntime"]),
    ("ort-option-on-nncf", engine_variant(engine="nncf", calibrate_method="entropy"),
     ["quantize.variants.0", "calibrate_method is an option of engine: onnxruntime", "uses engine: nncf"]),
    ("nncf-option-on-qpipe", engine_variant(preset="mixed"),
     ["quantize.variants.0", "preset is an option of engine: nncf", "set engine: nncf"]),
    ("nncf-option-on-dynamic", variant(1, fast_bias_correction=False, preset="mixed"),
     ["quantize.variants.1", "preset is an option of engine: nncf", "dynamic"]),
    ("engine-on-qat", variant(2, engine="nncf"), ["quantize.variants.2", "engine only applies to method: static"]),
    ("nncf-without-openvino", lambda s: (engine_variant(engine="nncf")(s),
                                         s["benchmark"].update(runtimes=["torchscript", "onnxruntime"])),
     ["quantize.variants.0.engine", "openvino", "add openvino to benchmark.runtimes"]),
    ("ort-without-its-runtimes", lambda s: (engine_variant(engine="onnxruntime")(s),
                                            s["benchmark"].update(runtimes=["torchscript"])),
     ["quantize.variants.0.engine", "onnxruntime or openvino", "benchmark.runtimes"]),
    ("sweep-nncf-without-openvino", lambda s: (s.pop("quantize"), s.update(sweep={"variant_sets": {"peers": [
        {"name": "n", "method": "static", "engine": "nncf"}]}}), s["benchmark"].update(runtimes=["torchscript"])),
     ["sweep.variant_sets.peers.0.engine", "openvino"]),
]


@pytest.mark.parametrize(("edit", "expected"), [pytest.param(e, x, id=i) for i, e, x in ENGINE_REFUSED])
def test_engine_options_are_refused_by_name(edit: Callable[[dict], object], expected: list[str]) -> None:
    test_refused_spec_names_the_field(edit, expected)


def test_engine_variants_and_their_defaults() -> None:
    """Each engine is its own variant type with its own options and defaults; none has a
    calibration of qpipe's, and each is measured on the runtimes its model runs on."""
    from pipeline.spec import NncfVariant, OnnxRuntimeVariant

    spec = parse_spec(edited(lambda s: s["quantize"]["variants"].extend([
        {"name": "n", "method": "static", "engine": "nncf"},
        {"name": "o", "method": "static", "engine": "onnxruntime"},
        {"name": "o2", "method": "static", "engine": "onnxruntime", "per_channel": False, "preprocess": False,
         "calibrate_method": "percentile"}])))
    ptq, _, _, n, o, o2 = spec.quantize.variants
    assert (type(n), type(o), type(o2)) == (NncfVariant, OnnxRuntimeVariant, OnnxRuntimeVariant)
    assert n.engine_options() == {"engine": "nncf", "preset": "performance", "fast_bias_correction": True}
    assert o.engine_options() == {"engine": "onnxruntime", "calibrate_method": "minmax", "preprocess": True}
    assert (o2.per_channel, o2.preprocess, o2.calibrate_method) == (False, False, "percentile")
    assert not (n.CALIBRATED or o.CALIBRATED or n.EXPORTS_ONNX) and (n.observer, n.calibrate_method) == (None, None)
    assert ptq.engine == "qpipe" and ptq.engine_options() == {} and ptq.preset is None
    onnx = ["onnxruntime", "openvino"]
    assert (n.measured_on(onnx), o.measured_on(onnx), ptq.measured_on(onnx)) == (["openvino"], onnx, onnx)
    assert n.measured_on(["onnxruntime"]) == []


def test_engine_qpipe_keeps_the_spec_digest() -> None:
    """qpipe's own engine, default or spelled out, dumps (and so digests) as before engines existed;
    another engine's variant dumps its engine and options."""
    spec = load_spec(EXAMPLE)
    data = yaml.safe_load(EXAMPLE.read_text())
    for v in data["quantize"]["variants"]:
        if v["method"] == "static":
            v["engine"] = "qpipe"
    spelled = parse_spec(data)
    assert spec_digest(spelled) == spec_digest(spec) == \
        "ef16035de8b68eced9d71dd02649a788368584ced53bd7f46fc9aa435180fd8b"
    assert "engine" not in spelled.model_dump()["quantize"]["variants"][0]
    data["quantize"]["variants"].append({"name": "n", "method": "static", "engine": "nncf", "preset": "mixed"})
    dumped = parse_spec(data).model_dump()["quantize"]["variants"][-1]
    assert (dumped["engine"], dumped["preset"], dumped["fast_bias_correction"]) == ("nncf", "mixed", True)
