"""Corrupted and truncated artifacts: a stored object whose bytes no longer match the sha256
recorded for it is named and never loaded, a cached stage holding one is recomputed rather than
retried, a damaged last checkpoint costs one epoch, and a crash keeps the checkpoints.

The stages run in this process against a file store and against the session's SeaweedFS S3
server (the same code path), with a frozen-backbone resnet18 on 16 px digits; the crash test runs
a real worker process."""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import time
import uuid
from pathlib import Path

import pytest
import torch

from pipeline.errors import CorruptArtifact, OutOfMemory, StageError, TransientError
from pipeline.stages import execute, manifest_key
from pipeline.store import ArtifactRef, FileStore, S3Store, Store
from tests.conftest import plan_of

SPEC = {
    "name": "corrupt",
    "seed": 0,
    "data": {"source": "builtin:digits", "image_size": 16, "calib_size": 64},
    "model": {"arch": "resnet18"},
    # cpu: a resumed run is compared with an uninterrupted one to 1e-9, which holds on the CPU only
    "finetune": {"epochs": 2, "batch_size": 64, "lr": 0.01, "freeze_backbone": True, "device": "cpu"},
    "quantize": {"variants": [{"name": "ptq", "method": "static", "observer": "minmax"}]},
    "benchmark": {"batch_sizes": [1], "iterations": 2, "warmup": 1, "runtimes": ["torchscript"]},
}
UPSTREAM = ("ingest", "finetune", "calibrate:minmax")


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest, tmp_path: Path, one_thread) -> Store:
    """A fresh store of each kind (S3: a new prefix in the session's bucket)."""
    if request.param == "file":
        return FileStore(tmp_path / "store")
    request.getfixturevalue("s3_env")
    return S3Store(f"s3://qpipe/corrupt-{uuid.uuid4().hex[:8]}")


def run_upstream(store: Store, upto: tuple[str, ...] = UPSTREAM) -> dict[str, dict]:
    """Execute the plan's first stages; returns {node id: node} for them, with their manifests."""
    nodes = {n["id"]: n for n in plan_of(copy.deepcopy(SPEC), store) if n["id"] in upto}
    for node_id in upto:
        assert not execute(nodes[node_id], store).cached
    return nodes


def manifest_of(store: Store, node: dict) -> dict:
    return store.get_json(manifest_key(node["stage"], node["key"]))


def damage(store: Store, key: str, how: str = "flip") -> str:
    """Rewrite the object at ``key`` in place, one byte flipped or cut to half its length (what a
    bad disk or a broken proxy leaves); returns the damaged bytes' sha256."""
    data = bytearray(store.get_bytes(key))
    if how == "flip":
        data[len(data) // 2] ^= 0x55
    else:
        del data[len(data) // 2:]
    if isinstance(store, FileStore):
        (store.root / key).write_bytes(bytes(data))
    else:  # an overwrite with put_object, as a faulty client or proxy would leave it
        store.client.put_object(store.bucket, store._obj(key), io.BytesIO(bytes(data)), len(data))
    return hashlib.sha256(bytes(data)).hexdigest()


TARGETS = {  # what is damaged: the node that wrote it, and where its reference sits in the manifest
    "model": ("finetune", lambda m: m["outputs"]["state_dict"]),
    "ingest-shard": ("ingest", lambda m: m["outputs"]["train"][0]),
    "observers": ("calibrate:minmax", lambda m: m["outputs"]["observers"]),
}


@pytest.mark.parametrize("target", list(TARGETS))
def test_corrupt_cached_output_is_recomputed(store: Store, target: str, caplog: pytest.LogCaptureFixture) -> None:
    owner, ref_of = TARGETS[target]
    nodes = run_upstream(store, UPSTREAM[:UPSTREAM.index(owner) + 1])
    before = manifest_of(store, nodes[owner])
    ref = ref_of(before)
    key = store.key_of(ref["uri"])
    actual = damage(store, key)
    with caplog.at_level(logging.WARNING, logger="pipeline.stages"):
        result = execute(nodes[owner], store)
    assert not result.cached, "a cached stage with a corrupt output was served from the cache"
    warned = caplog.text
    assert key in warned and ref["sha256"] in warned and actual in warned, warned
    assert "dropping the cached result" in warned
    fresh = ref_of(result.manifest)
    store.verify(fresh)  # the output was written again and matches its new manifest
    assert store.key_of(fresh["uri"]) == key
    if owner == "finetune":  # recomputed from the stored checkpoints, not trained again
        assert result.manifest["resumed_from_epoch"] == SPEC["finetune"]["epochs"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.stages"):
        assert execute(nodes[owner], store).cached  # intact again: served from the cache
    assert "damaged" not in caplog.text


def test_fetch_of_corrupt_object_fails_at_once_and_is_recomputed_on_rerun(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    nodes = run_upstream(store, ("ingest",))
    finetune = next(n for n in plan_of(copy.deepcopy(SPEC), store) if n["id"] == "finetune")
    ref = manifest_of(store, nodes["ingest"])["outputs"]["train"][0]
    key = store.key_of(ref["uri"])
    actual = damage(store, key)
    monkeypatch.setenv("QPIPE_STORE_ATTEMPTS", "30")  # a retry of an outage would take minutes
    dest = tmp_path / "fetched.pt"
    started = time.monotonic()
    with pytest.raises(CorruptArtifact) as info:
        store.fetch(ref, dest)
    assert time.monotonic() - started < 1.0, "the digest mismatch was retried"
    err = info.value
    assert (err.key, err.expected, err.actual) == (key, ref["sha256"], actual)
    assert key in str(err) and ref["sha256"] in str(err) and actual in str(err)
    assert isinstance(err, StageError) and not isinstance(err, TransientError)  # failed, never retried
    assert not dest.exists()  # nothing corrupt is left for a loader
    # a downstream stage reading the corrupt shard fails naming it, and writes nothing
    with caplog.at_level(logging.WARNING):
        with pytest.raises(CorruptArtifact) as info:
            execute(finetune, store)
    assert info.value.key == key
    assert "retry" not in caplog.text
    assert not store.exists(manifest_key("finetune", finetune["key"]))
    # the rerun does not serve the corrupt ingest from its cache: it is recomputed, then used
    assert not execute(nodes["ingest"], store).cached
    store.verify(manifest_of(store, nodes["ingest"])["outputs"]["train"][0])
    assert not execute(finetune, store).cached


def test_unreadable_manifest_is_recomputed(tmp_path: Path, one_thread) -> None:
    store = FileStore(tmp_path / "store")
    nodes = run_upstream(store, ("ingest",))
    path = store.root / manifest_key("ingest", nodes["ingest"]["key"])
    path.write_bytes(path.read_bytes()[:40])  # cut mid-JSON
    result = execute(nodes["ingest"], store)
    assert not result.cached and manifest_of(store, nodes["ingest"]) == result.manifest


def checkpoint_key(node: dict, epoch: int) -> str:
    return f"stages/{node['stage']}/{node['key']}/checkpoints/epoch-{epoch:04d}.pt"


@pytest.mark.parametrize(("store", "how"), [  # the S3 store shares the code path: one kind of damage there
    ("file", "truncate"), ("file", "flip"), ("file", "unrecorded"), ("file", "unloadable"),
    pytest.param("s3", "truncate", marks=pytest.mark.integration)], indirect=["store"])
def test_damaged_last_checkpoint_falls_back_to_the_one_before(store: Store, how: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    nodes = run_upstream(store, ("ingest", "finetune"))
    node = nodes["finetune"]
    reference = manifest_of(store, node)["history"]
    last = checkpoint_key(node, 2)
    if how in ("truncate", "flip"):
        damage(store, last, "cut" if how == "truncate" else "flip")
    elif how == "unrecorded":  # the stage died between the checkpoint and its digest record
        store.delete(f"{last}.json")
    else:  # bytes that match their record but are no checkpoint
        garbage = store.put_bytes(last, b"PK\x03\x04 not a zip archive" * 8)
        store.put_json(f"{last}.json", {"epoch": 2, "sha256": garbage.sha256, "size": garbage.size})
    store.delete(manifest_key("finetune", node["key"]))  # as if killed before its manifest
    with caplog.at_level(logging.INFO, logger="pipeline.train"):
        result = execute(node, store)
    assert result.manifest["resumed_from_epoch"] == 1, caplog.text
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and last in warned[0] and "falling back" in warned[0], warned
    assert checkpoint_key(node, 1) in caplog.text  # the log says which one it resumed from
    history = result.manifest["history"]  # the resumed epoch equals the uninterrupted one
    assert [h["epoch"] for h in history] == [1, 2]
    for got, want in zip(history, reference, strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-6)
        assert got["val_accuracy"] == pytest.approx(want["val_accuracy"], abs=1e-9)
    record = store.get_json(f"{last}.json")  # epoch 2 was written again, with its record
    store.verify(ArtifactRef(store.url(last), record["sha256"], record["size"]))


def test_out_of_memory_names_the_fix_and_keeps_the_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                one_thread) -> None:
    import pipeline.train

    store = FileStore(tmp_path / "store")
    run_upstream(store, ("ingest",))
    node = next(n for n in plan_of(copy.deepcopy(SPEC), store) if n["id"] == "finetune")
    real, calls = pipeline.train.train_one_epoch, []

    def second_epoch_does_not_fit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # what a CUDA allocator raises; this CPU run has no CUDA to exhaust
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
                                              "total capacity of 79.15 GiB of which 1.02 GiB is free.")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline.train, "train_one_epoch", second_epoch_does_not_fit)
    with pytest.raises(OutOfMemory) as info:
        execute(node, store)
    message = str(info.value)
    assert isinstance(info.value, StageError)
    for part in ("finetune ran out of", "batch size 64", "Tried to allocate 2.00 GiB", "Lower the batch size",
                 "data.image_size", "kept"):
        assert part in message, message
    assert store.exists(checkpoint_key(node, 1)) and store.exists(f"{checkpoint_key(node, 1)}.json")
    assert not store.exists(checkpoint_key(node, 2))
    assert not torch.cuda.is_initialized()  # a CPU-only run never touches CUDA
    monkeypatch.setattr(pipeline.train, "train_one_epoch", real)
    assert execute(node, store).manifest["resumed_from_epoch"] == 1  # the rerun continues from epoch 1


@pytest.mark.integration
def test_unexpected_error_in_a_worker_keeps_the_checkpoints(tmp_path: Path) -> None:
    """A real worker, a real crash: the store refuses epoch 2's checkpoint with an OSError that
    is no qpipe error (a directory stands where the file goes). The clean-up of the failed stage
    removes its partial outputs but keeps its checkpoints, for the rerun to resume from."""
    from tests.servers import Cluster

    store = FileStore(tmp_path / "store")
    spec = copy.deepcopy(SPEC)
    spec["quantize"]["variants"] = [{"name": "dyn", "method": "dynamic"}]
    node = next(n for n in plan_of(spec, store) if n["id"] == "finetune")
    folder = store.root / f"stages/finetune/{node['key']}"
    (store.root / checkpoint_key(node, 2)).mkdir(parents=True)
    (folder / "model.ts").write_bytes(b"left by an earlier attempt")  # a partial output: removed
    with Cluster(tmp_path, store.uri) as cluster:
        worker = cluster.worker("cpu,gpu", logs=tmp_path / "logs")
        run = cluster.client().submit(copy.deepcopy(spec)).wait(timeout=300)
        stage = next(s for s in run["stages"] if s["id"] == "finetune")
        assert stage["state"] == "failed" and "IsADirectoryError" in stage["error"], stage
        assert "crashed" in Path(worker.log_path).read_text(errors="replace")  # the generic branch ran
        left = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        assert left == ["checkpoints/epoch-0001.pt", "checkpoints/epoch-0001.pt.json"], left
