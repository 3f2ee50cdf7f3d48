"""bench/peers.py: the pure helpers that turn measurements into ratios and verdicts, the specs it
runs qpipe with, and (with the optional ``peers`` extra installed) a smoke test of the two peer
quantizers on a tiny network. The benchmark itself is run by hand, never by the suite."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent


def _load_peers():
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "bench" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


peers = _load_peers()


def rounds(*p50s: float) -> list[dict]:
    return [{"p50_ms": v, "p95_ms": v, "samples": 3} for v in p50s]


def test_case_specs_are_the_demo_spec_with_the_case_applied_and_validate(tmp_path: Path) -> None:
    args = peers.parse_args(["--threads", "2", "--batch-sizes", "1,8", "--archs", "resnet18,mobilenet_v2",
                             "--large-archs", "resnet18"])
    cases = peers.cases(args)
    assert [c.name for c in cases] == ["resnet18@64", "mobilenet_v2@64", "resnet18@224"]
    assert [c.judge_accuracy for c in cases] == [True, True, False]
    # by default: the four archs of the issue at both sizes, in one run
    every = [c.name for c in peers.cases(peers.parse_args([]))]
    assert every == [f"{a}@{s}" for s in (64, 224) for a in peers.ARCHS.split(",")]
    demo = load_spec(peers.DEMO_SPEC)
    for case in cases:
        spec = load_spec(peers.case_spec(case, args))
        assert (spec.model.arch, spec.data.image_size) == (case.arch, case.image_size)
        assert spec.benchmark.threads == 2 and spec.benchmark.batch_sizes == [1, 8]
        assert spec.data.calib_size == demo.data.calib_size and spec.data.val_fraction == demo.data.val_fraction
    full64, large = load_spec(peers.case_spec(cases[0], args)), load_spec(peers.case_spec(cases[2], args))
    # qpipe's static variants and, inside its own tournament, the other engines
    assert [v.name for v in full64.quantize.variants] == ["ptq-minmax", "ptq-histogram", "nncf", "ort-minmax"]
    assert [getattr(v, "engine", "qpipe") for v in full64.quantize.variants] == ["qpipe", "qpipe", "nncf",
                                                                                 "onnxruntime"]
    no_engines = peers.cases(peers.parse_args(["--no-engines", "--archs", "resnet18", "--large-size", "0"]))
    assert [v["name"] for v in no_engines[0].variants] == ["ptq-minmax", "ptq-histogram"]
    assert full64.finetune.epochs == demo.finetune.epochs
    assert large.finetune.epochs == 1 and all(v.method == "static" for v in large.quantize.variants)
    assert load_spec(peers.case_spec(cases[1], args)).finetune.epochs == peers.EPOCHS["mobilenet_v2"]
    # the large case starts from the small case's checkpoint when that ran, from random weights otherwise
    assert cases[2].init_from == "resnet18@64" and large.model.weights is None
    ckpt = tmp_path / "fp32.pt"
    assert load_spec(peers.case_spec(cases[2], args, init=ckpt)).model.weights == str(ckpt)
    assert peers.cases(peers.parse_args(["--archs", "mobilenet_v2", "--large-archs", "resnet18"]))[-1].init_from is None

    quick = peers.parse_args(["--quick"])
    qcases = peers.cases(quick)
    assert [c.name for c in qcases] == [f"{a}@64" for a in peers.ARCHS.split(",")]  # no large case
    qspec = load_spec(peers.case_spec(qcases[0], quick))
    assert qspec.finetune.epochs == 1 and [v.name for v in qspec.quantize.variants] == ["ptq-minmax", "nncf"]
    assert quick.rounds <= 2


def test_bad_arguments_are_refused() -> None:
    for argv in (["--threads", "0"], ["--archs", "", "--large-size", "0"], ["--image-size", "8"],
                 ["--batch-sizes", "0,1"]):
        with pytest.raises(SystemExit) as err:
            peers.parse_args(argv)
        assert err.value.code == 2, argv


def test_latency_ratio_takes_the_fastest_peer_of_each_round() -> None:
    per_form = {peers.QPIPE: rounds(2.0, 2.0, 9.0),
                peers.NNCF: rounds(1.0, 4.0, 3.0),
                peers.ORT: rounds(4.0, 2.5, 10.0)}
    # round ratios: 2/1, 2/2.5, 9/3 -> median 2.0; a peer that is fastest overall but not per round
    assert peers.fastest_peer_ratios(per_form) == pytest.approx(2.0)
    assert peers.fastest_peer_ratios(per_form, rounds=[1]) == pytest.approx(0.8)
    assert peers.fastest_peer_ratios(per_form, rounds=[]) is None
    verdict = peers.judge(0.95, 1.0, 0.9)
    assert verdict["met"] is True and verdict["aim_met"] is False and verdict["margin"] == pytest.approx(0.05)
    assert peers.judge(1.01, 1.0, 0.9)["met"] is False
    assert peers.judge(None, 1.0, 0.9)["met"] is None


def test_a_missed_median_is_a_tie_unless_a_sign_test_says_qpipe_is_slower() -> None:
    lost_all = [1.02, 1.01, 1.03, 1.02, 1.04]
    assert peers.slower_p_value(lost_all) == pytest.approx(1 / 32)  # five coin flips, all lost
    slower = peers.judge(1.02, 1.0, 0.9, lost_all)
    assert slower["verdict"] == "slower" and slower["rounds_faster"] == "0/5" and slower["met"] is False
    mixed = [1.02, 0.99, 1.01, 0.98, 1.03]  # won 2 of 5: P(X <= 2) = (1 + 5 + 10) / 32
    assert peers.slower_p_value(mixed) == pytest.approx(0.5)
    tie = peers.judge(1.01, 1.0, 0.9, mixed)
    assert tie["verdict"] == "tie" and tie["met"] is False and tie["slower_p"] == 0.5
    assert peers.judge(0.99, 1.0, 0.9, mixed)["verdict"] == "met"
    assert peers.slower_p_value([1.0, 1.0, 1.01]) == pytest.approx(0.5)  # exact ties left out: one round, lost
    assert peers.slower_p_value([1.0]) == 1.0 and peers.slower_p_value([]) is None


def test_drop_verdict_counts_points_and_images() -> None:
    worse = peers.drop_verdict({peers.QPIPE: 0.01, peers.NNCF: 0.005, peers.ORT: 0.0}, images=400)
    assert worse["met"] is False and worse["qpipe_minus_nncf_images"] == 2
    one = peers.drop_verdict({peers.QPIPE: 0.0075, peers.NNCF: 0.005, peers.ORT: 0.0}, images=400)
    assert one["met"] is True and one["qpipe_minus_nncf_images"] == 1  # within one validation image
    tie = peers.drop_verdict({peers.QPIPE: 0.0025, peers.NNCF: 0.0025, peers.ORT: 0.5}, images=400)
    assert tie["met"] is True and tie["qpipe_minus_nncf"] == 0


def test_overall_needs_every_judged_target_and_ignores_unjudged_accuracy() -> None:
    def case(lat: dict, acc: bool | None) -> dict:
        return {"targets": {"latency": lat, "latency_aim": {k: False for k in lat}, "accuracy": acc}}

    ok = peers.overall({"a@64": case({"1": True, "32": True}, True), "a@224": case({"1": True}, None)})
    assert ok["all_met"] is True and "a@224" not in ok["drop_no_larger_than_nncf"]
    missed = peers.overall({"a@64": case({"1": True, "32": False}, True)})
    assert missed["all_met"] is False and missed["latency_no_slower_than_fastest_peer"]["a@64 batch 32"] is False


def test_the_selected_variant_or_the_most_accurate_when_none_was_selected() -> None:
    assert peers.pick_variant({"selected": "ptq-minmax", "selection_reason": "fastest"}) == ("ptq-minmax", "fastest")
    name, why = peers.pick_variant({"selected": None, "selection_reason": "no variant is within the budget",
                                    "variants": [{"name": "a", "accuracy_top1": 0.5},
                                                 {"name": "b", "accuracy_top1": 0.7},
                                                 {"name": "c", "accuracy_top1": None}]})
    assert name == "b" and "selected none" in why
    with pytest.raises(RuntimeError, match="no int8 variant"):
        peers.pick_variant({"selected": None, "variants": [{"name": "c", "accuracy_top1": None}]})


def test_native_writes_to_stdout_go_to_stderr_and_the_json_stream_to_stdout(capfd: pytest.CaptureFixture) -> None:
    with peers.stdout_to_stderr() as out:
        os.write(1, b"progress bar\n")
        print("a library's print")
        print('{"json": 1}', file=out)
    print("after")
    captured = capfd.readouterr()
    assert captured.out == '{"json": 1}\nafter\n'
    assert "progress bar" in captured.err and "a library's print" in captured.err


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.body(x), 1))


def test_both_peers_quantize_a_tiny_net_to_int8_close_to_fp32(tmp_path: Path) -> None:
    missing = peers.missing_peers()
    if missing:
        pytest.skip(f"the optional 'peers' extra is not installed ({', '.join(missing)} missing): "
                    "pip install -e '.[peers]'")
    torch.manual_seed(0)
    model = Tiny().eval()
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8, generator=gen)
    mean_std = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    example = (torch.zeros(1, 3, 16, 16),)

    fp32_onnx = tmp_path / "fp32.onnx"
    assert peers.export_onnx(model, example, fp32_onnx).startswith("torch.onnx.export")
    peers.quantize_ort(fp32_onnx, tmp_path / "ort.onnx", images[:16], mean_std)
    _, settings = peers.quantize_nncf(model, example, tmp_path / "nncf.xml", images[:16], mean_std)
    assert settings["subset_size"] == 16
    assert peers.onnx_layers(tmp_path / "ort.onnx") == {"int8": 3, "fp32": 0}
    assert peers.openvino_layers(tmp_path / "nncf.xml")["int8"] >= 2  # both convolutions

    x = peers.normalize(images[16:], **mean_std)  # images the calibration did not see
    with torch.no_grad():
        ref = model(x)
    for runner in (peers.OrtRunner(tmp_path / "ort.onnx", 1), peers.OvRunner(tmp_path / "nncf.xml", 1)):
        out = runner(x)
        assert out.shape == ref.shape and torch.isfinite(out).all()
        cosine = torch.nn.functional.cosine_similarity(out, ref, dim=1).min().item()
        assert cosine > 0.95, f"{type(runner).__name__}: int8 logits far from fp32 (min cosine {cosine:.3f})"
        assert runner(x[:1]).shape == (1, 4)  # another batch size works on the same runner


def test_missing_extra_exits_2_with_the_install_hint(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(peers, "missing_peers", lambda: ["openvino"])
    assert peers.main(["--quick"]) == 2
    assert "pip install -e '.[peers]'" in capsys.readouterr().err
