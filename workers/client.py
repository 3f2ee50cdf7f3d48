"""The Python API: submit a pipeline, then follow it through a handle.

    from workers.client import Client
    client = Client(broker="redis://127.0.0.1:6379/0", store="s3://qpipe/runs")
    run = client.submit("examples/digits.yaml")    # a path, a dict or a PipelineSpec
    print(run.run_id, run.status()["status"])
    summary = run.wait(timeout=3600)               # the summary dict (see README)
    run.cancel()

``submit`` validates the spec and checks the store and the broker before anything is enqueued:
a refused spec raises ``SpecError`` and nothing is sent. It records the run's plan in the store
(``runs/{run_id}/plan.json``) before enqueuing it, so the store knows what every run in flight
needs (``pipeline.registry``).

After a run (``Registry``; the broker is optional, and ``Client`` has the same methods):

    from workers.client import Registry
    reg = Registry(store="s3://qpipe/runs", broker="redis://...")   # or the embedded default's
    reg.runs(limit=10)                                  # newest first: id, status, selection
    reg.pull(run_id, "model/")                          # the served model, verified, with a README
    reg.predict("model/", ["cat.jpg", "val-folder/"])  # top-k per image, top-1 of an ImageFolder
    reg.gc(keep_last=5, dry_run=False)                  # what no kept or running run needs
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from workers.app import broker_url, configure, create_app
from workers.state import FINAL_RUN_STATES, RunState, connect

if TYPE_CHECKING:
    from pipeline.registry import Collection, Pulled
    from pipeline.store import Store

log = logging.getLogger(__name__)
RUNS_INDEX = "qpipe:runs"  # the zset of run ids that RunState.create adds to
STAGE_LOCKS = "qpipe:lock:"  # workers.locks.lock_name: qpipe:lock:{stage}:{key}
STORE_LOCK_TTL = 120  # seconds the collection lock outlives a holder that died; a collection renews it
SUBMIT_WAIT = 300.0  # seconds a submission waits for a running collection to finish removing
GC_WAIT = 600.0


def redact(url: str) -> str:
    """A broker URL without its password, for messages and logs."""
    from kombu.utils.url import maybe_sanitize_url

    return maybe_sanitize_url(url)


def check_broker(url: str) -> redis.Redis:
    from pipeline.errors import ConfigError

    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"broker URL {redact(url)} is not a Redis/Valkey URL: use redis://HOST:PORT/DB")
    client = connect(url)
    try:
        client.ping()
    except redis.AuthenticationError:
        raise ConfigError(f"the broker at {redact(url)} refused the password: check the URL") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as err:
        raise ConfigError(f"cannot reach the broker at {redact(url)} ({type(err).__name__}): start Redis/Valkey "
                          "there or fix --broker / QPIPE_BROKER_URL") from None
    return client


def new_run_id(name: str) -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    return f"{name}-{stamp}-{secrets.token_hex(3)}"


class RunHandle:
    """A submitted run: status while in flight, the summary once done."""

    def __init__(self, client: Client, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self._state = RunState(client.redis, run_id)

    def __repr__(self) -> str:
        return f"RunHandle({self.run_id!r})"

    def status(self) -> dict[str, Any]:
        """The run summary so far: ``status`` is PENDING/RUNNING until the run ends, and
        ``stages`` lists every stage with its state, progress, worker and error."""
        meta = self._state.meta()
        if not meta:
            summary = self.client.stored_summary(self.run_id)
            if summary is None:
                raise KeyError(f"no run {self.run_id!r} in the broker or the store")
            return summary
        stages = self._state.stages()
        plan = json.loads(meta["plan"])
        rows = []
        for n in plan:
            s = stages.get(n["id"], {})
            rows.append({"id": n["id"], "stage": n["stage"], "variant": n.get("variant"),
                         "state": s.get("state", "pending"), "progress": s.get("progress", 0.0),
                         "worker": s.get("worker"), "error": s.get("error"), "detail": s.get("detail"),
                         "started": s.get("started"), "finished": s.get("finished"),
                         "attempt": s.get("attempt"), "key": n["key"]})
        if meta.get("summary"):
            out = json.loads(meta["summary"])
        else:
            out = {"run_id": self.run_id, "name": meta.get("name"), "baseline": None, "variants": [],
                   "selected": None, "report": None, "report_html": None, "plots": {}, "data": None}
        out["status"] = meta.get("status", "PENDING")
        if meta.get("error"):
            out["error"] = meta["error"]
        out["stages"] = rows
        out["cancel_requested"] = meta.get("cancel") == "1"
        return out

    def done(self) -> bool:
        return self._state.get("status") in FINAL_RUN_STATES

    def wait(self, timeout: float | None = None, poll: float = 1.0,
             on_update: Callable[[dict], None] | None = None) -> dict[str, Any]:
        """Block until the run ends; returns its summary. ``on_update`` sees each status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.status()
            if on_update:
                on_update(st)
            if st["status"] in FINAL_RUN_STATES:
                return st
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {self.run_id} still {st['status']} after {timeout}s")
            time.sleep(poll)

    def cancel(self) -> None:
        """Ask the run to stop: queued stages are skipped, running ones stop within a batch."""
        self._state.request_cancel()

    def summary(self) -> dict[str, Any]:
        st = self.status()
        st.pop("stages", None)
        return st


class Client:
    def __init__(self, broker: str | None = None, store: str | None = None, app=None) -> None:
        from pipeline.errors import ConfigError
        from pipeline.settings import settings

        url = broker_url(broker)
        if not url:
            raise ConfigError("no broker: pass --broker redis://HOST:PORT/DB or set QPIPE_BROKER_URL "
                              "(or use `qpipe run` without one for the embedded default)")
        self.broker = url
        self.store_uri = store or settings().store_uri
        # an app of its own: a Celery app caches its result backend, so one app re-pointed at
        # another broker would keep talking to the first one
        self.app = configure(app, url) if app is not None else create_app(url)
        self._redis: redis.Redis | None = None

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = check_broker(self.broker)
        return self._redis

    def submit(self, spec: Any) -> RunHandle:
        """Validate, upload local data, plan, record and enqueue a pipeline. Returns at once."""
        from pipeline.errors import ConfigError
        from pipeline.plan import build_plan
        from pipeline.registry import record_plan, sources_missing
        from pipeline.sources import prepare_sources
        from pipeline.spec import load_spec, spec_digest
        from pipeline.store import open_store
        from workers.canvas import build_canvas

        spec = load_spec(spec)
        if not self.store_uri:
            raise ConfigError("no artifact store: pass --store URI or set QPIPE_STORE_URI")
        store = open_store(self.store_uri)
        store.check()
        _ = self.redis  # fail fast on an unreachable broker, before uploading anything
        sources = prepare_sources(spec, store)
        # the run's record and a garbage collection exclude each other: once recorded, nothing
        # the run needs is removed (pipeline.registry)
        with excluding_gc(store, self.redis, wait=SUBMIT_WAIT):
            if sources_missing(store, sources):  # removed by a collection since the upload
                sources = prepare_sources(spec, store)
            plan = build_plan(spec, sources)
            run_id = new_run_id(spec.name)
            digest = spec_digest(spec)
            record_plan(store, run_id, name=spec.name, plan=plan, spec_sha256=digest)
            state = RunState(self.redis, run_id)
            state.create(name=spec.name, store=store.uri, spec=spec.model_dump(mode="json"), spec_sha256=digest,
                         plan=plan)
        result = build_canvas(self.app, plan, run_id, store.uri).apply_async()
        state.set(root_task=result.id)
        # progress is read from the run status, not from result messages: stop listening now,
        # while the broker is surely there, instead of when the result is garbage-collected
        node = result
        while node is not None:
            node.backend.remove_pending_result(node)
            node = node.parent
        log.info("submitted %s (%d stages) to %s", run_id, len(plan), redact(self.broker))
        return RunHandle(self, run_id)

    def run(self, run_id: str) -> RunHandle:
        return RunHandle(self, run_id)

    def stored_summary(self, run_id: str) -> dict[str, Any] | None:
        """The summary a finished run left in the store (when the broker forgot the run)."""
        from pipeline.store import ArtifactMissing, check_key, open_store

        if not self.store_uri:
            return None
        try:
            return open_store(self.store_uri).get_json(f"runs/{check_key(run_id)}/summary.json")
        except (ArtifactMissing, ValueError):
            return None

    # after a run: the same as Registry's, on this client's store and broker
    def registry(self) -> Registry:
        return Registry(self.store_uri, self.broker)

    def runs(self, limit: int | None = 20) -> list[dict[str, Any]]:
        return self.registry().runs(limit)

    def pull(self, run_id: str, dest: str | Path, *, variant: str = "selected", runtime: str = "auto") -> Pulled:
        return self.registry().pull(run_id, dest, variant=variant, runtime=runtime)

    def predict(self, target: str | Path, images: list[str | Path], *, top_k: int = 5) -> dict[str, Any]:
        return self.registry().predict(target, images, top_k=top_k)

    def gc(self, **policy: Any) -> dict[str, Any]:
        return self.registry().gc(**policy)


# ------------------------------------------------------------------------------------ after a run

def store_lock_name(store_uri: str) -> str:
    return f"qpipe:store-lock:{hashlib.sha256(store_uri.encode()).hexdigest()[:16]}"


@contextlib.contextmanager
def excluding_gc(store: Store, r: redis.Redis | None, *, wait: float) -> Iterator[Callable[[], None]]:
    """Hold the lock that a submission's record and a garbage collection of ``store`` share (see
    ``pipeline.registry``): the file store's own lock, and redis-py's ``Lock`` in the broker
    when there is one (it expires STORE_LOCK_TTL s after a holder that died). Yields a renewal,
    which raises once the lock was lost. TransientError when it stays held for ``wait`` s."""
    from redis.exceptions import LockError

    from pipeline.errors import TransientError
    from pipeline.registry import file_lock

    with file_lock(store, wait):
        if r is None:
            yield lambda: None
            return
        lock = r.lock(store_lock_name(store.uri), timeout=STORE_LOCK_TTL, blocking_timeout=wait, thread_local=False)
        if not lock.acquire():
            raise TransientError(f"the store {store.uri} stayed locked by a garbage collection (qpipe gc) or a "
                                 f"submission for {wait:.0f}s: retry when it is done")
        try:
            yield lock.reacquire  # raises LockNotOwnedError once the lock expired and another took it
        finally:
            with contextlib.suppress(LockError):
                lock.release()


def broker_runs(r: redis.Redis, store_uri: str) -> dict[str, dict[str, Any]]:
    """{run_id: record} of the runs the broker knows on ``store_uri``: name, status, times and
    the plan's nodes (ids, stages and keys; no configs)."""
    fields = ("name", "status", "store", "created", "started", "finished", "plan")
    ids = list(r.zrange(RUNS_INDEX, 0, -1))
    pipe = r.pipeline(transaction=False)
    for rid in ids:
        pipe.hmget(RunState(r, rid).meta_key, fields)
    out = {}
    for rid, values in zip(ids, pipe.execute(), strict=True):
        rec = dict(zip(fields, values, strict=True))
        if rec["status"] is None or (rec["store"] and rec["store"] != store_uri):
            continue  # expired, or another store's
        rec["plan"] = json.loads(rec["plan"]) if rec["plan"] else []
        out[rid] = rec
    return out


def forget(r: redis.Redis, run_ids: list[str]) -> None:
    """Remove runs from the broker's record (their status hashes and their place in the index),
    once a collection removed them from the store: neither lists them any more."""
    if not run_ids:
        return
    pipe = r.pipeline(transaction=False)
    for rid in run_ids:
        state = RunState(r, rid)
        pipe.delete(state.meta_key, state.stages_key)
    pipe.zrem(RUNS_INDEX, *run_ids)
    pipe.execute()


def stage_locks(r: redis.Redis) -> set[str]:
    """The output folders (``stages/{stage}/{key}``) of the stages computing right now: those
    whose stage lock (``workers.locks``) is held."""
    out = set()
    for name in r.scan_iter(match=f"{STAGE_LOCKS}*", count=500):
        parts = name[len(STAGE_LOCKS):].split(":", 1)
        if len(parts) == 2:
            out.add(f"stages/{parts[0]}/{parts[1]}")
    return out


def resolve_store(explicit: str | None = None) -> str:
    """The store to read: ``explicit``, QPIPE_STORE_URI, or the embedded default's
    (``$QPIPE_HOME/store``) where it exists."""
    from pipeline.errors import ConfigError
    from pipeline.settings import settings

    knobs = settings()
    uri = explicit or knobs.store_uri
    if uri:
        return uri
    default = knobs.home.expanduser().resolve() / "store"
    if default.is_dir():
        return default.as_uri()
    raise ConfigError(f"no artifact store: pass --store URI or set QPIPE_STORE_URI (the embedded default's store, "
                      f"{default}, does not exist here: `qpipe run` writes it, under QPIPE_HOME)")


class Registry:
    """The runs a store holds, after they ran (``pipeline.registry``): list them, pull one model
    with what serving it needs, predict with a pulled model, collect what no run needs. The
    broker is optional: with one, runs in flight are listed and protected by what the broker
    knows, and a collection excludes submissions through it; without one, the store's records
    alone decide."""

    def __init__(self, store: str | None = None, broker: str | None = None) -> None:
        self.store_uri = resolve_store(store)
        self.broker = broker_url(broker)
        self._store: Store | None = None
        self.notes: list[str] = []  # what the last call could not do (an unreachable broker)

    @property
    def store(self) -> Store:
        from pipeline.store import open_store

        if self._store is None:
            self._store = open_store(self.store_uri)
        return self._store

    def _redis(self, required: bool) -> redis.Redis | None:
        from pipeline.errors import ConfigError

        if not self.broker:
            return None
        try:
            return check_broker(self.broker)
        except ConfigError as err:
            if required:
                raise
            self.notes.append(f"{err}; showing what the store holds")
            return None

    def runs(self, limit: int | None = 20) -> list[dict[str, Any]]:
        """The newest ``limit`` runs (None: all), newest first: ``Run.row()`` of each."""
        from pipeline.registry import runs

        r = self._redis(required=False)
        return [run.row() for run in runs(self.store, broker_runs(r, self.store.uri) if r else None, limit=limit)]

    def pull(self, run_id: str, dest: str | Path, *, variant: str = "selected", runtime: str = "auto") -> Pulled:
        from pipeline.registry import pull

        return pull(self.store, run_id, dest, variant=variant, runtime=runtime)

    def predict(self, target: str | Path, images: list[str | Path], *, top_k: int = 5) -> dict[str, Any]:
        """Predict with the model pulled into the folder ``target``, or with the model a run
        selected (``target`` a run id: pulled into a temporary folder first)."""
        from pipeline.predict import predict

        if Path(target).is_dir():
            return predict(target, images, top_k=top_k)
        with tempfile.TemporaryDirectory(prefix="qpipe-predict-") as tmp:
            self.pull(str(target), Path(tmp) / "model")
            return predict(Path(tmp) / "model", images, top_k=top_k) | {"model": str(target)}

    def gc(self, *, keep_last: int | None = None, older_than_days: float | None = None,
           grace_minutes: float = 60.0, dry_run: bool = True,
           on_plan: Callable[[Collection], None] | None = None) -> dict[str, Any]:
        """Collect what no kept or running run needs (see ``pipeline.registry``). Decides, tells
        ``on_plan``, then removes unless ``dry_run``, and has the broker forget the runs removed.
        Returns what was decided and done."""
        from pipeline.errors import ConfigError
        from pipeline.registry import Policy, collect, remove
        from pipeline.store import FileStore

        policy = Policy(keep_last, older_than_days, grace_minutes * 60.0)
        store = self.store
        r = self._redis(required=not dry_run)
        if r is None and not isinstance(store, FileStore):
            if not dry_run and self.broker is None:
                raise ConfigError(f"collecting {store.uri} needs its broker, to see the runs in flight and to hold off "
                                  "submissions meanwhile: pass --broker or set QPIPE_BROKER_URL (or --dry-run)")
            self.notes.append("no broker: runs in flight are known by their plan.json in the store only")
        guard = contextlib.nullcontext(lambda: None) if dry_run else excluding_gc(store, r, wait=GC_WAIT)
        with guard as renew:
            found = collect(store, policy, broker=broker_runs(r, store.uri) if r else None,
                            locked=stage_locks(r) if r else set())
            if on_plan is not None:
                on_plan(found)
            removed = (0, 0) if dry_run else remove(store, found, renew=renew)
            if r is not None and not dry_run:
                forget(r, [run.run_id for run in found.removed])
        return {
            "store": store.uri, "dry_run": dry_run,
            "kept": [{"run_id": run.run_id, "status": run.status, "why": why} for run, why in found.kept],
            "removed_runs": [run.run_id for run in found.removed],
            "objects": len(found.objects), "bytes": found.bytes, "by_folder": found.counts(),
            "spared_young": found.spared,
            "removed": {"objects": removed[0], "bytes": removed[1]},
            "notes": list(self.notes),
        }
