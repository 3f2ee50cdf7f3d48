"""Proof that the gpu queue trains on a GPU, survives losing its worker there, and makes artifacts a
CPU-only machine scores the same.

What it does (on a machine with an NVIDIA GPU)
    Starts a private Valkey (``workers.embedded.EmbeddedValkey``), a ``file://`` store in a temp dir,
    one cpu-queue worker and one gpu-queue worker (``qpipe worker --queues gpu --require-cuda``,
    ``workers.embedded.WorkerProcess``), with short leases so a dead worker's stage comes back in
    seconds. It runs the demo spec (``examples/digits.yaml``) with ``finetune.device: cuda``,
    ``finetune.precision: bf16`` (``--precision``), TorchScript only, and at least ``--epochs``
    epochs (10: a GPU trains the demo's epoch in about a second, and the kill must land in the
    middle). Once the finetune stage's epoch-1 checkpoint and its digest record are in the
    store it SIGKILLs the gpu worker with its pool, starts another one, and waits for the run.

Checks (each reported with what was found)
    * ``run_succeeded``: the run ends SUCCESS.
    * ``finetune_resumed_on_cuda``: the finetune manifest says device cuda, resumed_from_epoch
      >= 1, every epoch of its history trained on cuda, in the precision asked for.
    * ``manifests_name_the_gpu``: the finetune and QAT manifests name a GPU the probe found (QAT
      in fp32), and the report shows that name.
    * ``artifacts_score_the_same_on_cpu``: a separate process with CUDA_VISIBLE_DEVICES="" (it
      asserts CUDA is unavailable) verifies each benchmarked artifact's sha256, loads it with
      ``torch.jit.load`` and scores it on the validation split with one thread, as the benchmark
      stage did; its top-1 must equal the summary's. The fine-tuned state_dict must load with
      ``weights_only=True`` as float32.

Output
    One JSON object on stdout (progress on stderr): ``status`` ok or failed, ``checks``, the
    ``probe`` (GPU, driver), timings. Exit 0 when every check passed, 1 when one failed, 2 when
    there is no usable CUDA device (``status: no CUDA device``, with the probe's reason: nothing
    was checked).

    .venv/bin/python -m bench.gpu_worker
    .venv/bin/python -m bench.gpu_worker --precision fp16 --epochs 20
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

FAST_LEASES = {"QPIPE_VISIBILITY_TIMEOUT": "15", "QPIPE_LEASE_INTERVAL": "2", "QPIPE_RESTORE_INTERVAL": "2",
               "QPIPE_LOCK_TTL": "8"}

# Runs with CUDA hidden: reads a JSON job on stdin, prints one JSON object.
CPU_SCORER = r"""
import json, sys
import torch
from pipeline.data import read_shards
from pipeline.models import load_state_dict
from pipeline.quant import load_torchscript, set_engine
from pipeline.store import ArtifactRef, open_store
from pipeline.train import evaluate

job = json.load(sys.stdin)
torch.set_num_threads(1)
store = open_store(job["store"])
work = __import__("pathlib").Path(job["workdir"])
paths = [store.fetch(ArtifactRef.from_dict(r), work / f"val-{i}.pt") for i, r in enumerate(job["val"])]
xv, yv = read_shards(paths)
set_engine(job["backend"])
out = {"cuda_available": torch.cuda.is_available(), "scores": {}}
for name, ref in job["artifacts"].items():
    model = load_torchscript(store.fetch(ArtifactRef.from_dict(ref), work / f"{name}.ts"))
    out["scores"][name] = evaluate(model, xv, yv, batch_size=64, mean=job["mean"], std=job["std"])["accuracy"]
state = load_state_dict(store.fetch(ArtifactRef.from_dict(job["state_dict"]), work / "fp32.pt"))
out["state_dict_dtypes"] = sorted({str(t.dtype) for t in state.values() if t.is_floating_point()})
print(json.dumps(out))
"""


def say(msg: str) -> None:
    print(f"[gpu_worker] {msg}", file=sys.stderr, flush=True)


def check(checks: dict[str, Any], name: str, ok: bool, **found: Any) -> None:
    checks[name] = {"ok": bool(ok), **found}
    say(f"{name}: {'ok' if ok else 'FAILED'} {json.dumps(found, default=str)[:300]}")


def wait_until(pred, timeout: float, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    return None


def demo_spec(path: Path, precision: str, epochs: int) -> dict[str, Any]:
    import yaml

    spec = yaml.safe_load(path.read_text())
    spec["name"] = "gpu-worker-proof"
    spec["finetune"] = {**spec.get("finetune", {}), "device": "cuda", "precision": precision}
    spec["finetune"]["epochs"] = max(int(spec["finetune"].get("epochs", 1)), epochs)
    spec["benchmark"] = {**spec.get("benchmark", {}), "runtimes": ["torchscript"]}
    return spec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default=str(ROOT / "examples" / "digits.yaml"))
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    ap.add_argument("--epochs", type=int, default=10, help="at least this many finetune epochs (default 10)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the run")
    args = ap.parse_args()

    from workers.gpu import probe

    found = probe()
    probe_out = {"devices": found.devices, "driver": found.driver, "torch": found.torch,
                 "cuda_runtime": found.cuda_runtime}
    if not found.usable:
        print(json.dumps({"status": "no CUDA device", "reason": f"no usable CUDA device: {found.why_none()}",
                          "probe": probe_out, "checks": {}}, indent=2))
        return 2
    gpu_names = {d["name"] for d in found.usable}

    from pipeline.stages import manifest_key
    from pipeline.store import open_store
    from workers.client import Client
    from workers.embedded import EmbeddedValkey, WorkerProcess

    os.environ.update(FAST_LEASES)  # the workers inherit them
    checks: dict[str, Any] = {}
    timings: dict[str, float] = {}
    spec = demo_spec(Path(args.spec), args.precision, args.epochs)
    with tempfile.TemporaryDirectory(prefix="qpipe-gpu-proof-") as tmp_name:
        tmp = Path(tmp_name)
        store_uri = (tmp / "store").as_uri()
        store = open_store(store_uri)
        broker = EmbeddedValkey(tmp / "broker", password=secrets.token_urlsafe(24), appendonly=True)
        broker.start(timeout=15.0)
        workers: list[WorkerProcess] = []

        def start(queue: str, *extra: str) -> WorkerProcess:
            w = WorkerProcess(queue, broker.url, store.uri, tmp / f"logs-{len(workers)}", extra_args=extra)
            workers.append(w)
            return w.start()

        try:
            t0 = time.monotonic()
            start("cpu")
            gpu_worker = start("gpu", "--require-cuda")
            timings["startup_s"] = round(time.monotonic() - t0, 2)
            handle = Client(broker.url, store.uri).submit(copy.deepcopy(spec))
            say(f"run {handle.run_id} submitted; waiting for finetune's epoch-1 checkpoint")
            t0 = time.monotonic()
            finetune_key = next(s["key"] for s in handle.status()["stages"] if s["id"] == "finetune")
            record = f"stages/finetune/{finetune_key}/checkpoints/epoch-0001.pt.json"
            seen = wait_until(lambda: store.exists(record), timeout=args.timeout)
            state = next(s for s in handle.status()["stages"] if s["id"] == "finetune")["state"]
            killed = bool(seen) and state == "running"
            if killed:
                gpu_worker.kill()  # SIGKILL, pool included: the message stays unacknowledged
                timings["kill_after_s"] = round(time.monotonic() - t0, 2)
                say("gpu worker killed after epoch 1; starting another")
                start("gpu", "--require-cuda")
            check(checks, "killed_mid_finetune", killed, checkpoint_seen=bool(seen), finetune_state=state,
                  hint=None if killed else "finetune ended before the kill could land: raise --epochs")
            t0 = time.monotonic()
            summary = handle.wait(timeout=args.timeout, poll=0.5)
            timings["run_after_kill_s"] = round(time.monotonic() - t0, 2)
            check(checks, "run_succeeded", summary["status"] == "SUCCESS", status=summary["status"],
                  failures=summary.get("failures"), error=summary.get("error"))
            stages = {s["id"]: s for s in summary.get("stages", [])}
            manifests = {}
            for sid in ("finetune", "qat:qat", "ingest"):
                if sid in stages and store.exists(manifest_key(stages[sid]["stage"], stages[sid]["key"])):
                    manifests[sid] = store.get_json(manifest_key(stages[sid]["stage"], stages[sid]["key"]))
            ft = manifests.get("finetune", {})
            history = ft.get("history", [])
            check(checks, "finetune_resumed_on_cuda",
                  ft.get("device") == "cuda" and (ft.get("resumed_from_epoch") or 0) >= 1
                  and bool(history) and all(h.get("device") == "cuda" for h in history)
                  and ft.get("precision") == args.precision,
                  device=ft.get("device"), resumed_from_epoch=ft.get("resumed_from_epoch"),
                  epochs=[h.get("epoch") for h in history], precision=ft.get("precision"),
                  epoch_devices=sorted({str(h.get("device")) for h in history}))
            qat = manifests.get("qat:qat", {})
            report = store.get_bytes(store.key_of(summary["report"])).decode() if summary.get("report") else ""
            check(checks, "manifests_name_the_gpu",
                  ft.get("device_name") in gpu_names and qat.get("device_name") in gpu_names
                  and qat.get("device") == "cuda" and qat.get("precision") == "fp32"
                  and all(n in report for n in {ft.get("device_name"), qat.get("device_name")} if n),
                  finetune=ft.get("device_name"), qat=qat.get("device_name"), qat_precision=qat.get("precision"),
                  cuda_visible_devices=[ft.get("cuda_visible_devices"), qat.get("cuda_visible_devices")],
                  probe=sorted(gpu_names))
            check(checks, "artifacts_score_the_same_on_cpu",
                  **_score_on_cpu(store, summary, manifests, tmp, spec))
        finally:
            for w in workers:
                try:
                    w.stop()
                except Exception as err:  # keep stopping the rest
                    say(f"stopping {w!r}: {err}")
            broker.stop()
    ok = all(c["ok"] for c in checks.values())
    print(json.dumps({"status": "ok" if ok else "failed", "probe": probe_out, "precision": args.precision,
                      "epochs": spec["finetune"]["epochs"], "checks": checks, "timings": timings}, indent=2))
    return 0 if ok else 1


def _score_on_cpu(store, summary: dict, manifests: dict, tmp: Path, spec: dict) -> dict[str, Any]:
    """Score every benchmarked artifact in a process that cannot see the GPU (CPU_SCORER)."""
    rows = [r for r in [summary.get("baseline"), *summary.get("variants", [])] if r and r.get("artifact")]
    ingest, ft = manifests.get("ingest"), manifests.get("finetune")
    if not rows or not ingest or not ft:
        return {"ok": False, "why": "the run left no artifacts to score"}
    # each benchmark manifest holds its artifact's full reference (uri, sha256, size)
    artifacts = {r["name"]: store.get_json(store.key_of(r["manifest"]))["outputs"]["model"] for r in rows}
    job = {"store": store.uri, "workdir": str(tmp), "val": ingest["outputs"]["val"],
           "backend": spec.get("quantize", {}).get("backend", "x86"), "artifacts": artifacts,
           "mean": ingest["preprocess"]["mean"], "std": ingest["preprocess"]["std"],
           "state_dict": ft["outputs"]["state_dict"]}
    out = subprocess.run([sys.executable, "-c", CPU_SCORER], input=json.dumps(job), capture_output=True, text=True,
                         cwd=ROOT, timeout=900, env={**os.environ, "CUDA_VISIBLE_DEVICES": "",
                                                     "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        return {"ok": False, "why": f"the CPU-only scorer failed: {out.stderr.strip()[-800:]}"}
    got = json.loads(out.stdout.strip().splitlines()[-1])
    expected = {r["name"]: r["accuracy_top1"] for r in rows}
    differ = {n: [expected[n], got["scores"].get(n)] for n in expected
              if got["scores"].get(n) is None or abs(got["scores"][n] - expected[n]) > 1e-9}
    ok = not got["cuda_available"] and not differ and got["state_dict_dtypes"] == ["torch.float32"]
    return {"ok": ok, "cuda_available_there": got["cuda_available"], "scores": got["scores"], "differ": differ,
            "state_dict_dtypes": got["state_dict_dtypes"]}


if __name__ == "__main__":
    sys.exit(main())
