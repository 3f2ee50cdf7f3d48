"""The Python API: submit a pipeline, then follow it through a handle.

    from workers.client import Client
    client = Client(broker="redis://127.0.0.1:6379/0", store="s3://qpipe/runs")
    run = client.submit("examples/digits.yaml")    # a path, a dict or a PipelineSpec
    print(run.run_id, run.status()["status"])
    summary = run.wait(timeout=3600)               # the summary dict (see README)
    run.cancel()

``submit`` validates the spec and checks the store and the broker before anything is enqueued:
a refused spec raises ``SpecError`` and nothing is sent.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import redis

from workers.app import broker_url, configure, create_app
from workers.state import FINAL_RUN_STATES, RunState, connect

log = logging.getLogger(__name__)


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
        plan = build_plan(spec, prepare_sources(spec, store))
        run_id = new_run_id(spec.name)
        state = RunState(self.redis, run_id)
        state.create(name=spec.name, store=store.uri, spec=spec.model_dump(mode="json"),
                     spec_sha256=spec_digest(spec), plan=plan)
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
