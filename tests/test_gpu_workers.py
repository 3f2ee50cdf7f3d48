"""GPU workers on a machine without a GPU: what can be proven on the CPU.

- each pool process of a gpu worker gets its own GPU (CUDA_VISIBLE_DEVICES), also the process
  that replaces one (``workers/gpu.py``);
- the CUDA probe runs in a child process and nothing in the worker's parent touches CUDA;
- ``--require-cuda`` refuses to start here, with the reason;
- a stage that needs CUDA is requeued by a worker without it, a bounded number of times;
- the finetune and QAT manifests say what they trained on ("cpu" here), and mixed precision
  is refused or falls back where there is no CUDA.

What needs a GPU is under tests/gpu/ (marked ``gpu``) and in bench/gpu_worker.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import wait_for
from workers import gpu

ROOT = Path(__file__).resolve().parent.parent
POOL_LINE = re.compile(r"pool process (\d+) \(pid (\d+)\): CUDA_VISIBLE_DEVICES=(\S+)")


def two_gpus(**extra) -> gpu.Probe:
    """What the probe reports on a machine with two usable GPUs."""
    devices = [{"index": i, "name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "memory_gib": 79.1}
               for i in range(2)]
    return gpu.Probe(devices=devices, driver="550.54.15", torch=torch.__version__, cuda_runtime="12.4", **extra)


# --------------------------------------------------------------------------- device assignment

def test_each_pool_index_gets_its_own_gpu() -> None:
    assert [gpu.device_for(i, ["3", "5"]) for i in range(2)] == ["3", "5"]
    # more pool processes than GPUs: round robin, never a device outside the list
    assert [gpu.device_for(i, ["3", "5"]) for i in range(5)] == ["3", "5", "3", "5", "3"]
    assert gpu.device_for(0, ["GPU-8e2c1f0a-1b2c-4d5e-9f00-112233445566"]).startswith("GPU-")
    with pytest.raises(ValueError, match="no GPUs"):
        gpu.device_for(0, [])


@pytest.mark.parametrize(("text", "problem"), [("0,,1", "'' is not a GPU"), ("cuda:0", "'cuda:0' is not a GPU"),
                                               ("1,1", "lists 1 twice"), ("", "'' is not a GPU")])
def test_bad_gpus_are_refused_with_the_fix(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)) as info:
        gpu.parse_gpus(text)
    assert "give" in str(info.value)


def test_default_is_one_pool_process_per_usable_gpu() -> None:
    setup = gpu.plan_worker(two_gpus(), None, None, env={})
    assert (setup.gpus, setup.concurrency, setup.warnings) == (["0", "1"], 2, [])
    assert "GPU 1: NVIDIA H100 80GB HBM3, compute capability 9.0, 79.1 GiB" in setup.lines
    assert any("NVIDIA driver 550.54.15" in line for line in setup.lines)
    # an inherited CUDA_VISIBLE_DEVICES: the probe's index i is its i-th entry
    assert gpu.plan_worker(two_gpus(), None, None, env={"CUDA_VISIBLE_DEVICES": "4,6"}).gpus == ["4", "6"]
    broken = two_gpus()
    broken.devices[0]["error"] = "no kernel image is available for execution on the device"
    setup = gpu.plan_worker(broken, None, None, env={})
    assert (setup.gpus, setup.concurrency) == (["1"], 1)
    assert any("GPU 0" in line and "unusable: no kernel image" in line for line in setup.lines)


def test_explicit_gpus_and_concurrency() -> None:
    setup = gpu.plan_worker(two_gpus(), "1", None, env={})
    assert (setup.gpus, setup.concurrency) == (["1"], 1)
    setup = gpu.plan_worker(two_gpus(), "0,1", 4, env={})
    assert setup.concurrency == 4 and any("share GPUs round robin" in w for w in setup.warnings)
    with pytest.raises(ValueError, match="no GPU 5 here; the probe sees 0, 1"):
        gpu.plan_worker(two_gpus(), "0,5", None, env={})


def test_without_cuda_the_worker_trains_on_the_cpu_and_says_so() -> None:
    none = gpu.Probe(reason="Found no NVIDIA driver on your system")
    setup = gpu.plan_worker(none, None, None, env={})
    assert (setup.gpus, setup.concurrency) == ([], 1)
    assert "no usable CUDA device: Found no NVIDIA driver on your system" in setup.lines
    assert any("requeued for a worker with CUDA" in w for w in setup.warnings)
    setup = gpu.plan_worker(none, "3,5", None, env={})  # applied all the same, with a warning
    assert (setup.gpus, setup.concurrency) == (["3", "5"], 2)
    assert any("--gpus 3,5 is applied all the same" in w for w in setup.warnings)


# ------------------------------------------------------------------------------- the probe

CUDA_ENTRY_POINTS = ("init", "is_available", "device_count", "_lazy_init", "get_device_properties",
                     "get_device_name", "current_device")


def test_probe_runs_in_a_child_and_this_process_never_touches_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    touched: list[str] = []
    for name in CUDA_ENTRY_POINTS:
        monkeypatch.setattr(torch.cuda, name, lambda *a, _name=name, **k: touched.append(_name))
    quick = gpu.probe()
    full = gpu.ProbeProcess(driver_check=False).result()  # the child imports torch and calls torch.cuda.init()
    assert touched == [] and not torch.cuda.is_initialized()
    assert quick.usable == [] and "libcuda.so.1" in quick.reason and quick.torch is None
    # torch's own answer, from the child: its version and why CUDA did not initialise there
    assert full.torch == torch.__version__ and full.reason and full.usable == []
    assert "no usable CUDA device: " + full.reason in full.lines()


def test_worker_modules_and_probe_leave_cuda_alone_in_the_parent(tmp_path: Path) -> None:
    """What the prefork parent runs before forking (the CLI, the tasks, every stage module, the
    probe) calls none of torch.cuda's entry points: each is replaced by a recorder first."""
    script = textwrap.dedent(f"""
        import json, torch
        touched = []
        for name in {CUDA_ENTRY_POINTS!r}:
            setattr(torch.cuda, name, lambda *a, _n=name, **k: touched.append(_n))
        import workers.cli, workers.tasks, workers.gpu
        from pipeline.stages import load_all
        load_all()
        found = workers.gpu.probe()
        print(json.dumps({{"touched": touched, "initialized": torch.cuda.is_initialized(),
                          "reason": found.reason}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"touched": [], "initialized": False, "reason": seen["reason"]} and seen["reason"]


def qpipe(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("QPIPE_BROKER_URL", "QPIPE_STORE_URI")}
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**clean, "PYTHONPATH": str(ROOT), **(env or {})})


def test_require_cuda_refuses_to_start_without_a_gpu(tmp_path: Path) -> None:
    started = time.monotonic()
    out = qpipe("worker", "--queues", "gpu", "--require-cuda", "--store", (tmp_path / "store").as_uri())
    assert out.returncode == 2, out.stderr
    message = out.stderr.strip().splitlines()[-1]
    assert message.startswith("qpipe: refused: --require-cuda: no usable CUDA device: no NVIDIA driver"), message
    assert "drop --require-cuda to train on the CPU" in message
    assert "no broker" not in out.stderr  # refused before connecting to anything
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(("args", "problem"), [
    (("--queues", "cpu", "--gpus", "0"), "--gpus 0 only applies to a worker of the gpu queue"),
    (("--queues", "gpu", "--gpus", "0,gpu1"), "'gpu1' is not a GPU"),
])
def test_bad_gpus_option_is_refused(tmp_path: Path, args: tuple[str, ...], problem: str) -> None:
    out = qpipe("worker", *args, "--store", (tmp_path / "store").as_uri())
    assert out.returncode == 2 and problem in out.stderr, out.stderr


# ---------------------------------------------------------------- training on the CPU, as before

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def reference_epoch(model, x, y, optimizer, generator, batch_size: int) -> dict[str, float]:
    """The training loop as it read before the GPU data path: normalise on the host, read the loss
    and the correct count after every batch into Python numbers."""
    from pipeline.train import batches

    model.train()
    loss_fn = torch.nn.CrossEntropyLoss()
    m, s = torch.tensor(MEAN).view(1, -1, 1, 1), torch.tensor(STD).view(1, -1, 1, 1)
    total, correct, seen = 0.0, 0, 0
    for idx in batches(len(y), batch_size, generator):
        xb = (x[idx].float().div_(255.0) - m) / s
        optimizer.zero_grad(set_to_none=True)
        out = model(xb)
        loss = loss_fn(out, y[idx])
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
        correct += (out.argmax(1) == y[idx]).sum().item()
        seen += len(idx)
    return {"loss": total / seen, "accuracy": correct / seen}


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Dropout(0.2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(8, 10))


def tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (150, 3, 12, 12), dtype=torch.uint8, generator=g), torch.randint(0, 10, (150,),
                                                                                                generator=g)


def test_cpu_training_is_bit_for_bit_the_loop_it_replaced(one_thread) -> None:
    """On the CPU the device-side sums (float64, int64) and the per-pass mean/std tensors round
    exactly as the per-batch Python numbers did: same losses, accuracies and weights."""
    from pipeline.train import evaluate, train_one_epoch

    x, y = tiny_data()
    runs = []
    for loop in ("reference", "qpipe"):
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(3)
        if loop == "reference":
            metrics = [reference_epoch(model, x, y, opt, gen, 32) for _ in range(2)]
        else:
            metrics = [train_one_epoch(model, x, y, opt, batch_size=32, mean=MEAN, std=STD,
                                       device=torch.device("cpu"), generator=gen) for _ in range(2)]
        runs.append((metrics, [p.detach().clone() for p in model.parameters()], model))
    (ref_metrics, ref_weights, ref_model), (metrics, weights, model) = runs
    assert metrics == ref_metrics
    assert all(torch.equal(a, b) for a, b in zip(ref_weights, weights, strict=True))
    got = evaluate(model, x, y, batch_size=64, mean=MEAN, std=STD)
    with torch.no_grad():
        ref_model.eval()
        out = ref_model((x.float().div_(255.0) - torch.tensor(MEAN).view(1, -1, 1, 1))
                        / torch.tensor(STD).view(1, -1, 1, 1))
    assert got["accuracy"] == (out.argmax(1) == y).sum().item() / len(y)
    assert not torch.cuda.is_initialized()


class Ctx:
    """The part of a StageContext that training uses, over a file store."""

    def __init__(self, store, workdir: Path) -> None:
        self.store, self.workdir, self.stage, self.prefix, self.extra = store, workdir, "finetune", "t", {}

    def progress(self, *_) -> None:
        pass

    def check_cancelled(self, *_) -> None:
        pass

    def images(self, *_) -> None:
        pass


def test_fp16_training_checkpoints_and_resumes_its_gradient_scaler(tmp_path: Path, one_thread) -> None:
    """The mixed-precision path (autocast, and fp16's gradient scaler), run through on the CPU's
    autocast: the scaler's state goes into every checkpoint, and a run resumed after epoch 1 ends
    exactly like one that was never interrupted, scaler included."""
    from pipeline.store import FileStore
    from pipeline.train import load_checkpoint, train_epochs

    x, y = tiny_data()
    kwargs = dict(batch_size=32, lr=0.05, momentum=0.9, weight_decay=0.0, mean=MEAN, std=STD,
                  device=torch.device("cpu"), seed=0, precision="fp16")
    whole = Ctx(FileStore(tmp_path / "whole"), tmp_path)
    reference = train_epochs(tiny_model(), whole, x, y, x, y, epochs=2, **kwargs)
    resumed = Ctx(FileStore(tmp_path / "resumed"), tmp_path)
    train_epochs(tiny_model(), resumed, x, y, x, y, epochs=1, **kwargs)
    first = load_checkpoint(resumed)["scaler"]
    assert first["scale"] > 0 and first["_growth_tracker"] > 0, first  # the scaler ran and was saved
    history = train_epochs(tiny_model(), resumed, x, y, x, y, epochs=2, **kwargs)
    assert resumed.extra["resumed_from_epoch"] == 1
    assert load_checkpoint(resumed)["scaler"] == load_checkpoint(whole)["scaler"]

    def measured(h: list[dict]) -> list[dict]:
        return [{k: v for k, v in e.items() if k not in ("seconds", "images_per_second")} for e in h]

    assert measured(history) == measured(reference)
    assert {(e["precision"], e["device_name"]) for e in history} == {("fp16", "cpu")}


# ---------------------------------------------------------- spec, plan and manifests (in process)

SPEC = {
    "name": "gpu-workers",
    "seed": 0,
    "data": {"source": "builtin:digits", "image_size": 16, "calib_size": 64},
    "model": {"arch": "resnet18"},
    "finetune": {"epochs": 1, "batch_size": 64, "lr": 0.01, "freeze_backbone": True},
    "quantize": {"variants": [{"name": "qat", "method": "qat", "epochs": 1, "lr": 0.001}]},
    "benchmark": {"batch_sizes": [1], "iterations": 2, "warmup": 1, "runtimes": ["torchscript"]},
}


def with_finetune(**fields) -> dict:
    spec = json.loads(json.dumps(SPEC))
    spec["finetune"].update(fields)
    return spec


def test_precision_is_refused_where_it_cannot_run() -> None:
    from pipeline.errors import SpecError
    from pipeline.spec import parse_spec

    with pytest.raises(SpecError, match=r"finetune.precision: bf16 is mixed precision on CUDA, and finetune.device "
                                        r"is cpu: set device: cuda \(or auto\), or remove precision"):
        parse_spec(with_finetune(precision="bf16", device="cpu"))
    qat_with_precision = json.loads(json.dumps(SPEC))
    qat_with_precision["quantize"]["variants"][0]["precision"] = "bf16"
    with pytest.raises(SpecError, match="quantize.variants.0.precision: unknown key"):
        parse_spec(qat_with_precision)
    assert parse_spec(with_finetune(precision="fp16", device="cuda")).finetune.precision == "fp16"


def test_precision_enters_the_finetune_key_and_fp32_keys_do_not_move(plan_store) -> None:
    from tests.conftest import plan_of

    def keys(spec: dict) -> dict[str, str]:
        return {n["id"]: n["key"] for n in plan_of(spec, plan_store)}

    base, fp32, bf16 = keys(SPEC), keys(with_finetune(precision="fp32")), keys(with_finetune(precision="bf16"))
    assert fp32 == base  # specs written before the option keep their cached stages
    assert bf16["ingest"] == base["ingest"]
    assert {i for i in base if bf16[i] != base[i]} == set(base) - {"ingest"}  # finetune and all it feeds
    qat = next(n for n in plan_of(with_finetune(precision="bf16"), plan_store) if n["stage"] == "qat")
    assert "precision" not in qat["config"]  # QAT trains in fp32


def test_manifests_record_the_device_and_precision_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture, one_thread) -> None:
    """On this CPU worker: finetune (bf16 asked, device auto) trains in fp32 and says why; its
    manifest and QAT's name the device ("cpu") and the CUDA_VISIBLE_DEVICES the process had."""
    import logging

    from pipeline.report import trained_on
    from pipeline.stages import execute
    from pipeline.store import FileStore
    from tests.conftest import plan_of

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # as a --gpus worker sets it in a pool process
    store = FileStore(tmp_path / "store")
    nodes = {n["id"]: n for n in plan_of(with_finetune(precision="bf16"), store)}
    with caplog.at_level(logging.WARNING, logger="pipeline.stages.finetune"):
        manifests = {i: execute(nodes[i], store).manifest for i in ("ingest", "finetune", "qat:qat")}
    ft, qat = manifests["finetune"], manifests["qat:qat"]
    assert (ft["device"], ft["device_name"], ft["cuda_visible_devices"], ft["precision"]) == ("cpu", "cpu", "5",
                                                                                             "fp32")
    assert ft["precision_note"] == "precision bf16 needs CUDA and this worker trained on the cpu: trained in fp32"
    assert ft["precision_note"] in caplog.text
    assert (qat["device"], qat["device_name"], qat["precision"]) == ("cpu", "cpu", "fp32")
    assert "precision_note" not in qat
    assert all((h["device_name"], h["precision"]) == ("cpu", "fp32") for h in ft["history"] + qat["history"])
    assert trained_on({"history": {"fp32": ft["history"], "qat": qat["history"]}}) == \
        "fp32: cpu (cpu, fp32); qat: cpu (cpu, fp32)"
    assert not torch.cuda.is_initialized()


def test_report_says_where_each_model_trained() -> None:
    from pipeline.report import html_page, markdown

    gpu_epochs = [{"epoch": 1, "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "precision": "bf16"}]
    summary = {"name": "r", "run_id": "r-1", "status": "SUCCESS", "variants": [], "batch_sizes": [1],
               "history": {"fp32": gpu_epochs + [{"epoch": 2, "device": "cpu", "device_name": "cpu",
                                                  "precision": "fp32"}],
                           "qat": [{"epoch": 1, "device": "cpu"}]}}  # a manifest from before the field
    line = "Trained on: fp32: NVIDIA H100 80GB HBM3 (cuda, bf16) then cpu (cpu, fp32); qat: cpu (cpu)."
    assert line in markdown(summary, {}).splitlines()
    assert f"<p>{line}</p>" in html_page(summary, {})
    assert "Trained on" not in markdown({**summary, "history": {}}, {})


def test_stage_that_needs_cuda_raises_the_requeued_error_here(tmp_path: Path) -> None:
    from pipeline.errors import DeviceUnavailable, TransientError
    from pipeline.train import pick_device

    with pytest.raises(DeviceUnavailable) as info:
        pick_device("cuda", "qat")
    assert isinstance(info.value, TransientError)  # the worker's retry path: requeued, with backoff, bounded
    message = str(info.value)
    assert message.startswith("qat needs CUDA (finetune.device: cuda), and this worker has no usable CUDA device: ")
    assert "Requeued for a worker with CUDA" in message and "finetune.device: auto" in message
    assert pick_device("auto").type == "cpu" and pick_device("cpu").type == "cpu"


# ------------------------------------------------------- real worker processes (integration)

def pool_lines(log: Path) -> list[tuple[int, int, str]]:
    return [(int(i), int(pid), dev) for i, pid, dev in POOL_LINE.findall(log.read_text(errors="replace"))]


@pytest.mark.integration
def test_gpu_pool_processes_get_their_own_gpus_and_keep_them_when_replaced(tmp_path: Path) -> None:
    from tests.servers import Cluster

    with Cluster(tmp_path, (tmp_path / "store").as_uri()) as cluster:
        worker = cluster.worker("gpu", logs=tmp_path / "logs", concurrency=2, gpus="3,5")
        first = wait_for(lambda: len(pool_lines(worker.log_path)) >= 2 and pool_lines(worker.log_path), timeout=60)
        assert {i: dev for i, _, dev in first} == {0: "3", 1: "5"}, first
        log = worker.log_path.read_text(errors="replace")
        assert "no usable CUDA device: no NVIDIA driver" in log  # the probe ran at start, and said why
        # billiard replaces a pool process that died (as after --max-tasks-per-child) under the same index
        victim = next(pid for i, pid, _ in first if i == 0)
        os.kill(victim, signal.SIGKILL)
        lines = wait_for(lambda: len(pool_lines(worker.log_path)) >= 3 and pool_lines(worker.log_path), timeout=60)
        (index, pid, device), = lines[2:]
        assert (index, device) == (0, "3") and pid != victim
        kids = subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True).stdout.split()
        assert str(pid) in kids, "the replacement is a pool process of this worker"


@pytest.fixture(scope="module")
def gpu_fleet(tmp_path_factory: pytest.TempPathFactory):
    """A broker, a cpu worker, and a gpu worker started with --gpus 3,5 --concurrency 2 on this
    machine without CUDA; retries short (2, backoff 1 s) so a requeued stage gives up quickly."""
    from tests.servers import Cluster

    tmp = tmp_path_factory.mktemp("gpu-fleet")
    with Cluster(tmp, (tmp / "store").as_uri(), {"QPIPE_MAX_RETRIES": "2", "QPIPE_RETRY_BACKOFF_MAX": "1"}) as fleet:
        fleet.worker("cpu", logs=tmp / "logs"), fleet.worker("gpu", logs=tmp / "logs", concurrency=2, gpus="3,5")
        yield fleet.as_dict()


@pytest.mark.integration
def test_each_stage_runs_on_its_pool_process_gpu(gpu_fleet: dict) -> None:
    """The finetune and QAT stages ran in pool processes of the --gpus 3,5 worker: each manifest
    records the CUDA_VISIBLE_DEVICES its process had, one of the two, as the process's init line
    says."""
    from pipeline.stages import manifest_key
    from pipeline.store import open_store
    from workers.client import Client

    handle = Client(gpu_fleet["broker"], gpu_fleet["store"]).submit(json.loads(json.dumps(SPEC)))
    summary = handle.wait(timeout=600)
    gpu_log = gpu_fleet["workers"][1].log_path
    assert summary["status"] == "SUCCESS", (summary.get("failures"), gpu_log.read_text()[-3000:])
    store = open_store(gpu_fleet["store"])
    lines = pool_lines(gpu_log)
    assert {dev for _, _, dev in lines} == {"3", "5"} and all(dev == {0: "3", 1: "5"}[i] for i, _, dev in lines)
    for s in (s for s in summary["stages"] if s["stage"] in ("finetune", "qat")):
        manifest = store.get_json(manifest_key(s["stage"], s["key"]))
        assert manifest["cuda_visible_devices"] in ("3", "5"), manifest
        assert (manifest["device"], manifest["device_name"]) == ("cpu", "cpu")


@pytest.mark.integration
def test_stage_that_needs_cuda_is_requeued_then_failed_with_the_reason(gpu_fleet: dict) -> None:
    """finetune.device: cuda on gpu workers without CUDA: not failed for good at the first
    delivery, but retried (a new message any worker may take) QPIPE_MAX_RETRIES times, then
    failed saying why and what to do."""
    from workers.client import Client

    # another lr: the device is no part of the key, and the first test's finetune would be served cached
    handle = Client(gpu_fleet["broker"], gpu_fleet["store"]).submit(with_finetune(device="cuda", lr=0.02))
    summary = handle.wait(timeout=300)
    gpu_log = gpu_fleet["workers"][1].log_path.read_text(errors="replace")
    assert summary["status"] == "FAILED"
    finetune = next(s for s in summary["stages"] if s["id"] == "finetune")
    assert finetune["state"] == "failed" and finetune["attempt"] == 3, finetune
    assert finetune["error"].startswith("gave up after 2 retries: finetune needs CUDA (finetune.device: cuda), "
                                        "and this worker has no usable CUDA device: "), finetune["error"]
    assert "CUDA_VISIBLE_DEVICES=" in finetune["error"] and "Requeued for a worker with CUDA" in finetune["error"]
    requeues = re.findall(rf"{handle.run_id} finetune: finetune needs CUDA .*; retry (\d) in", gpu_log)
    assert requeues == ["1", "2"], gpu_log[-3000:]
    assert f"{handle.run_id} finetune crashed" not in gpu_log
