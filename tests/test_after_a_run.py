"""After a run, as a user goes on: ``qpipe runs``, ``qpipe pull``, ``qpipe predict`` and ``qpipe gc``
against the embedded default's file store (a real ``qpipe run``) and against an S3 store served
by real worker processes, with a run in flight while the collection removes."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import redis
import yaml
from PIL import Image

from pipeline.registry import file_lock
from pipeline.store import FileStore, open_store
from tests.helpers import wait_for
from tests.servers import Cluster, RedisServer
from workers.client import Client, store_lock_name
from workers.state import RunState

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
# static int8 on two runtimes: the report may serve each batch size with another form
SPEC = {
    "name": "after",
    "data": {"source": "builtin:digits", "image_size": 16, "calib_size": 32},
    "finetune": {"epochs": 1, "batch_size": 64, "lr": 0.01},
    "quantize": {"variants": [{"name": "ptq", "method": "static", "observer": "minmax"}]},
    "benchmark": {"batch_sizes": [1, 4], "iterations": 3, "warmup": 1, "accuracy_budget": 1.0,
                  "runtimes": ["torchscript", "onnxruntime"]},
}
# the S3 runs: TorchScript only, one dynamic variant; B differs from A in its fine-tune only (same ingest)
S3_SPEC = {**SPEC, "quantize": {"variants": [{"name": "dyn", "method": "dynamic"}]},
           "benchmark": {**SPEC["benchmark"], "runtimes": ["torchscript"]}}
S3_SPEC_B = {**S3_SPEC, "finetune": {"epochs": 2, "batch_size": 64, "lr": 0.02}}


def qpipe(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 600):
    """``qpipe ARGS`` in a new process, with the S3 credentials of this one and no other QPIPE_*."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("QPIPE_") or k.startswith("QPIPE_S3_")}
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], capture_output=True, text=True,
                          env=base | (env or {}) | {"PYTHONPATH": str(ROOT)}, timeout=timeout, cwd=cwd or ROOT)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def user_images(root: Path) -> tuple[Path, Path, list[Path]]:
    """An ImageFolder of digits (two per class, 24x20, grey PNGs) with a broken PNG and a stray
    text file, and one RGBA image outside it: (folder, single image, the decodable images)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder = root / "mine"
    good = []
    for i in range(20):
        label = int(digits.target[i])
        path = folder / str(label) / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 255 / 16).round().astype(np.uint8), mode="L").resize((24, 20)).save(path)
        good.append(path)
    whole = next((folder / "3").glob("*.png")).read_bytes()
    (folder / "3" / "broken.png").write_bytes(whole[: len(whole) // 2])  # cut off, as by an interrupted copy
    (folder / "notes.txt").write_text("not an image")
    single = root / "single.png"
    Image.fromarray((digits.images[30] * 255 / 16).round().astype(np.uint8), mode="L").convert("RGBA").save(single)
    return folder, single, sorted(good) + [single]


def readme_script(folder: Path, section: str) -> str:
    """The pulled README's image reading followed by one runtime's snippet: a whole script."""
    text = (folder / "README.md").read_text()
    blocks = {m.group(1): re.search(r"```python\n(.*?)```", m.group(2), re.S)
              for m in re.finditer(r"^## (.+?)\n(.*?)(?=^## |\Z)", text, re.S | re.M)}
    return blocks["Reading an image"].group(1) + "\n" + blocks[section].group(1)


def run_isolated(script: str, args: list[str], cwd: Path) -> str:
    """``script`` in ``python -I -S``: neither the repository, the working folder, PYTHONPATH nor
    any .pth file (the editable install's import hook among them) on the path; the installed
    packages' folders added by hand, and a check that qpipe's packages cannot be imported."""
    folders = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    boot = (f"import sys; sys.path += {folders!r}; import importlib.util as u; "
            "assert u.find_spec('pipeline') is None and u.find_spec('workers') is None, 'qpipe is importable'; "
            f"assert not {{'', '.', {str(ROOT)!r}}} & set(sys.path), sys.path; "
            f"sys.argv = ['predict.py', *sys.argv[1:]]; exec(compile({script!r}, 'predict.py', 'exec'))")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", boot, *args], capture_output=True, text=True, cwd=cwd,
                          env={"PATH": os.environ.get("PATH", "")}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def tops(stdout: str) -> dict[str, list[tuple[str, float]]]:
    """{image: [(class, probability)]} from the snippet's lines ``PATH: c p, c p, ...``."""
    out = {}
    for line in stdout.splitlines():
        path, _, rest = line.rpartition(": ")
        out[path] = [(c, float(p)) for c, p in (item.split(" ") for item in rest.split(", "))]
    return out


def files_of(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}


# ------------------------------------------------------------------------ the embedded default

@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """One ``qpipe run`` of SPEC with the embedded default under its own QPIPE_HOME."""
    base = tmp_path_factory.mktemp("embedded")
    spec = base / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    env = {"QPIPE_HOME": str(base / "home")}
    out = base / "summary.json"
    ok(qpipe("run", str(spec), "--no-progress", "--output-json", str(out), env=env))
    summary = json.loads(out.read_text())
    assert summary["status"] == "SUCCESS"
    return {"env": env, "store": base / "home" / "store", "run_id": summary["run_id"], "summary": summary,
            "base": base}


def selected_row(summary: dict) -> dict:
    return next(v for v in summary["variants"] if v["name"] == summary["selected"])


def test_runs_lists_the_embedded_default_run(embedded):
    rows = json.loads(ok(qpipe("runs", "--json", env=embedded["env"])))  # no --store: $QPIPE_HOME/store
    s = embedded["summary"]
    assert [r["run_id"] for r in rows] == [s["run_id"]]
    row = rows[0]
    assert (row["name"], row["status"], row["selected"]) == ("after", "SUCCESS", s["selected"])
    assert row["runtime_per_batch"] == {b: c["runtime"] for b, c in s["selection_per_batch"].items()}
    assert row["runtime"] == s["selection_per_batch"]["1"]["runtime"]
    assert row["started"] and 0 < row["duration_s"] < 600
    text = ok(qpipe("runs", env=embedded["env"]))
    assert re.search(rf"^{s['run_id']}\s+after\s+SUCCESS\s+\S+ \S+\s+\S+\s+{s['selected']}\s+{row['runtime']}",
                     text, re.M), text


def test_pull_writes_the_served_forms_verified(embedded, tmp_path):
    dest = tmp_path / "model"
    out = ok(qpipe("pull", embedded["run_id"], str(dest), env=embedded["env"]))
    assert f"pulled ptq of run {embedded['run_id']}" in out
    manifest = json.loads((dest / "manifest.json").read_text())
    row = selected_row(embedded["summary"])
    # the form the report chose at each batch size, each in the file its runtime reads
    assert {b: s["runtime"] for b, s in manifest["serving"].items()} == row["runtime"]
    suffix = {"torchscript": ".ts", "onnxruntime": ".onnx"}
    for s in manifest["serving"].values():
        assert s["file"].endswith(suffix[s["runtime"]]) and (dest / s["file"]).is_file()
    models = {n for n, f in manifest["files"].items() if f.get("model")}
    assert models == {s["file"] for s in manifest["serving"].values()}
    for name, f in manifest["files"].items():  # every file is the one the store recorded
        assert sha256(dest / name) == f["sha256"], name
    bench = json.loads(Path(row["manifest"].removeprefix("file://")).read_text())
    assert {manifest["files"][n]["sha256"] for n in models} <= {ref["sha256"] for ref in bench["outputs"].values()}
    assert manifest["classes"] == [str(i) for i in range(10)] and manifest["preprocess"]["crop"] == 16
    assert manifest["summary_row"]["name"] == "ptq" and manifest["warnings"] == embedded["summary"]["warnings"]
    html = (dest / "report.html").read_text()
    pictures = re.findall(r'<img src="([^"]+)"', html)
    assert pictures and all((dest / p).is_file() for p in pictures)  # the report shows its pictures
    readme = (dest / "README.md").read_text()
    for rt in set(row["runtime"].values()):
        assert {"torchscript": "## Plain PyTorch", "onnxruntime": "## ONNX Runtime"}[rt] in readme
    # a second pull into the same folder is refused before anything is read
    again = qpipe("pull", embedded["run_id"], str(dest), env=embedded["env"])
    assert again.returncode == 2 and f"{dest} already exists and is not an empty folder" in again.stderr


def test_predict_from_the_pulled_folder_matches_plain_pytorch(embedded, tmp_path):
    dest = tmp_path / "model"
    ok(qpipe("pull", embedded["run_id"], str(dest), "--runtime", "torchscript", env=embedded["env"]))
    manifest = json.loads((dest / "manifest.json").read_text())
    assert {s["runtime"] for s in manifest["serving"].values()} == {"torchscript"}
    folder, single, good = user_images(tmp_path)
    missing = tmp_path / "missing.png"
    out = json.loads(ok(qpipe("predict", str(dest), str(folder), str(single), str(missing), "--json")))
    assert out["runtime"] == "torchscript" and out["variant"] == "ptq"
    assert [p["image"] for p in out["predictions"]] == [str(p) for p in good]
    skipped = {s["file"]: s["reason"] for s in out["skipped"]}  # named, with the ingest's reasons
    assert skipped.keys() == {str(folder / "3" / "broken.png"), str(folder / "notes.txt"), str(missing)}
    assert skipped[str(folder / "3" / "broken.png")].startswith("broken image")
    assert skipped[str(folder / "notes.txt")] == "file outside any class folder"
    correct = sum(p["top"][0]["class"] == p["label"] for p in out["predictions"] if "label" in p)
    assert out["top1"] == {"images": 20, "correct": correct, "accuracy": correct / 20}
    text = ok(qpipe("predict", str(dest), str(folder)))
    assert f"skipped {folder / '3' / 'broken.png'}: broken image" in text
    assert f"top-1 {correct / 20:.4f}: {correct} of 20 labelled image(s) right" in text
    # the README's plain-PyTorch script, in a process where qpipe cannot be imported, agrees
    plain = tops(run_isolated(readme_script(dest, "Plain PyTorch (TorchScript)"), [str(p) for p in good], dest))
    assert list(plain) == [str(p) for p in good]
    for p in out["predictions"]:
        mine = plain[p["image"]]
        assert [c for c, _ in mine] == [t["class"] for t in p["top"]], p["image"]
        assert all(abs(v - t["probability"]) < 1e-3 for (_, v), t in zip(mine, p["top"], strict=True)), p["image"]
    # a run id instead of a folder: its selected model, pulled on the fly
    by_id = json.loads(ok(qpipe("predict", embedded["run_id"], str(single), "--json", env=embedded["env"])))
    assert by_id["model"] == embedded["run_id"] and by_id["predictions"][0]["image"] == str(single)


def test_a_tampered_artifact_fails_the_pull_naming_it(embedded, tmp_path):
    row = selected_row(embedded["summary"])
    uri = row["runtimes"][row["runtime"]["1"]]["artifact"]
    stored = Path(uri.removeprefix("file://"))
    original = stored.read_bytes()
    stored.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        dest = tmp_path / "model"
        proc = qpipe("pull", embedded["run_id"], str(dest), env=embedded["env"])
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "refused, nothing written" in proc.stderr and uri in proc.stderr and "sha256" in proc.stderr
        assert not dest.exists() and not list(tmp_path.glob(".model.pull-*"))  # no folder, no leftovers
    finally:
        stored.write_bytes(original)
    ok(qpipe("pull", embedded["run_id"], str(tmp_path / "again"), env=embedded["env"]))


def test_gc_of_the_file_store_twice(embedded):
    """Runs last in this module: it ends by removing the run."""
    env, store = embedded["env"], embedded["store"]
    run_id = embedded["run_id"]
    old = time.time() - 7200
    orphans = [store / "stages" / "finetune" / ("0" * 32) / "checkpoints" / "epoch-0001.pt",
               store / "sources" / f"{'1' * 64}.tar"]
    young = store / "stages" / "quantize" / ("2" * 32) / "model.ts"  # as a stage being computed writes it
    for path in [*orphans, young]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1000)
    for path in orphans:
        os.utime(path, (old, old))
    needed = files_of(store) - {str(p.relative_to(store)) for p in [*orphans, young]}
    plan = json.loads((store / "runs" / run_id / "plan.json").read_text())["plan"]
    assert {f"stages/{n['stage']}/{n['key']}/manifest.json" for n in plan if n["stage"] != "report"} <= needed

    dry = ok(qpipe("gc", env=env))  # a dry run unless --yes: says what it would free, frees nothing
    assert f"keep    {run_id}  SUCCESS" in dry and "would remove 2 object(s), 2.0 KiB (sources: 1, stages: 1)" in dry
    assert "1 unneeded object(s) younger than 60 min left" in dry and "add --yes" in dry
    assert all(p.exists() for p in [*orphans, young])
    first = ok(qpipe("gc", "--yes", env=env))
    assert "removed 2 object(s), 2.0 KiB" in first
    assert not any(p.exists() for p in orphans) and young.exists()
    assert not orphans[0].parent.parent.exists()  # the emptied stage folder goes too
    assert files_of(store) == needed | {str(young.relative_to(store))}
    second = ok(qpipe("gc", "--yes", env=env))  # idempotent: nothing more to remove
    assert "removed 0 object(s), 0 B" in second and files_of(store) == needed | {str(young.relative_to(store))}
    ok(qpipe("pull", run_id, str(embedded["base"] / "after-gc"), env=env))  # every digest still verifies

    last = ok(qpipe("gc", "--keep-last", "0", "--grace-minutes", "0", "--yes", env=env))
    assert f"remove  {run_id}  SUCCESS" in last
    assert files_of(store) == set() and "no runs in" in ok(qpipe("runs", env=env))


# ------------------------------------------------------------------------ an S3 store and workers

@pytest.fixture(scope="module")
def s3_cluster(s3_env, tmp_path_factory):
    """Workers for the cpu and gpu queues on the session's S3 server, serving a store of their
    own (a collection removes every run it may, so it must not see other modules' runs), on a
    broker of their own: the session cluster's workers, for another store, would take its tasks."""
    with Cluster(tmp_path_factory.mktemp("after-a-run"), "s3://qpipe/after-a-run") as c:
        c.worker("cpu")
        c.worker("gpu")
        yield c


def stage_state(handle, node_id: str) -> str | None:
    return (handle._state.stage(node_id) or {}).get("state")


def test_s3_pull_and_gc_with_a_run_in_flight(s3_cluster, tmp_path):
    client = Client(s3_cluster.broker.url, s3_cluster.store)
    cli = ("--broker", s3_cluster.broker.url, "--store", s3_cluster.store)
    store = open_store(s3_cluster.store)
    a = client.submit(copy.deepcopy(S3_SPEC))
    first = a.wait(timeout=600)
    assert first["status"] == "SUCCESS", (first.get("failures"), s3_cluster.logs())
    rows = json.loads(ok(qpipe("runs", "--json", *cli)))
    assert [(r["run_id"], r["status"], r["selected"]) for r in rows] == [(a.run_id, "SUCCESS", first["selected"])]
    dest = tmp_path / "a"
    ok(qpipe("pull", a.run_id, str(dest), "--store", s3_cluster.store))
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["pulled_from"] == s3_cluster.store and (dest / "model.ts").is_file()
    assert all(sha256(dest / n) == f["sha256"] for n, f in manifest["files"].items())

    a_plan = {n["id"]: n for n in store.get_json(f"runs/{a.run_id}/plan.json")["plan"]}
    b = client.submit(copy.deepcopy(S3_SPEC_B))
    b_plan = {n["id"]: n for n in store.get_json(f"runs/{b.run_id}/plan.json")["plan"]}
    assert b_plan["ingest"]["key"] == a_plan["ingest"]["key"] and b_plan["finetune"]["key"] != a_plan["finetune"]["key"]
    wait_for(lambda: stage_state(b, "finetune") == "running", timeout=300)  # writing epochs no manifest names yet
    collected = ok(qpipe("gc", "--keep-last", "0", "--grace-minutes", "0", "--yes", *cli))
    assert RunState(client.redis, b.run_id).get("status") == "RUNNING", "B ended before the collection: slow it down"
    assert re.search(rf"^keep    {b.run_id}  RUNNING  \(in flight", collected, re.M), collected
    assert f"remove  {a.run_id}  SUCCESS" in collected and "removed " in collected
    listed = json.loads(ok(qpipe("runs", "--json", *cli)))  # B as the broker knows it; A gone from both
    assert [(r["run_id"], r["status"]) for r in listed] == [(b.run_id, "RUNNING")]
    assert not RunState(client.redis, a.run_id).exists()
    second = b.wait(timeout=600)
    assert second["status"] == "SUCCESS" and not second["failures"], s3_cluster.logs()

    keys = set(store.list("runs")) | set(store.list("stages"))
    assert not any(k.startswith(f"runs/{a.run_id}/") for k in keys)  # A's run, and what only A needed, went
    assert not any(k.startswith(f"stages/finetune/{a_plan['finetune']['key']}/") for k in keys)
    for node in b_plan.values():  # everything B needed stayed, the ingest it shares with A too
        if node["stage"] != "report":
            assert f"stages/{node['stage']}/{node['key']}/manifest.json" in keys, node["id"]
    ok(qpipe("pull", b.run_id, str(tmp_path / "b"), "--store", s3_cluster.store))
    ok(qpipe("gc", "--keep-last", "1", "--grace-minutes", "0", "--yes", *cli))
    again = ok(qpipe("gc", "--keep-last", "1", "--grace-minutes", "0", "--yes", *cli))
    assert "removed 0 object(s), 0 B" in again and f"keep    {b.run_id}  SUCCESS" in again



@pytest.mark.parametrize("hold", ["broker", "file"])
def test_a_submission_waits_while_a_collection_holds_the_store(tmp_path, hold):
    """The lock ``qpipe gc --yes`` holds from its decision to its last removal: the broker's, and
    a file store's own (the embedded default's broker is private to its run)."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(S3_SPEC))
    store = FileStore(tmp_path / "store")
    with RedisServer(data_dir=tmp_path / "redis") as server:  # its own: the runs enqueued here never run
        submit = [sys.executable, "-m", "workers.cli", "submit", str(spec), "--store", store.uri]
        env = {**os.environ, "QPIPE_BROKER_URL": server.url, "PYTHONPATH": str(ROOT)}
        t0 = time.monotonic()
        ok(subprocess.run(submit, capture_output=True, text=True, env=env, timeout=120))
        unhindered = time.monotonic() - t0  # unhindered, it records at once
        before = set(store.list("runs"))
        held = contextlib.ExitStack()
        if hold == "broker":
            lock = redis.Redis.from_url(server.url).lock(store_lock_name(store.uri), timeout=60)
            assert lock.acquire(blocking=False)
            held.callback(lock.release)
        else:
            held.enter_context(file_lock(store, wait=5))
        with held:
            waiting = subprocess.Popen(submit, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            time.sleep(2 + 2 * unhindered)
            assert waiting.poll() is None and set(store.list("runs")) == before  # waiting; nothing recorded
        out, err = waiting.communicate(timeout=120)
        assert waiting.returncode == 0, err
        assert store.exists(f"runs/{out.strip()}/plan.json")
