"""Run status in Redis: queryable while a run is in flight, by any client that reaches the
broker. One hash per run (``qpipe:run:{id}``) and one hash of stage states
(``qpipe:run:{id}:stages``, node id -> JSON); both expire 30 days after the last write."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_delay, wait_random_exponential

log = logging.getLogger(__name__)
T = TypeVar("T")

TTL = 30 * 24 * 3600
STAGE_STATES = ("pending", "running", "retrying", "done", "cached", "failed", "cancelled")
FINAL_RUN_STATES = ("SUCCESS", "FAILED", "CANCELLED")
BROKER_ERRORS = (redis.ConnectionError, redis.TimeoutError)


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=15, socket_connect_timeout=5, health_check_interval=30,
                                decode_responses=True)


class RunState:
    def __init__(self, client: redis.Redis, run_id: str) -> None:
        self.r = client
        self.run_id = run_id
        self.meta_key = f"qpipe:run:{run_id}"
        self.stages_key = f"qpipe:run:{run_id}:stages"

    def create(self, *, name: str, store: str, spec: dict, spec_sha256: str, plan: list[dict]) -> None:
        now = time.time()
        pipe = self.r.pipeline()
        pipe.hset(self.meta_key, mapping={
            "run_id": self.run_id, "name": name, "status": "PENDING", "store": store, "created": now,
            "spec": json.dumps(spec), "spec_sha256": spec_sha256,
            "plan": json.dumps([{k: n[k] for k in ("id", "stage", "variant", "queue", "key")} for n in plan]),
        })
        for n in plan:
            pipe.hset(self.stages_key, n["id"], json.dumps(
                {"stage": n["stage"], "variant": n.get("variant"), "state": "pending", "progress": 0.0,
                 "worker": None, "error": None, "key": n["key"]}))
        pipe.zadd("qpipe:runs", {self.run_id: now})
        pipe.expire(self.meta_key, TTL).expire(self.stages_key, TTL)
        pipe.execute()

    def exists(self) -> bool:
        return bool(self.r.exists(self.meta_key))

    def meta(self) -> dict[str, Any]:
        return self.r.hgetall(self.meta_key)

    def get(self, field: str) -> str | None:
        return self.r.hget(self.meta_key, field)

    def set(self, **fields: Any) -> None:
        self.r.hset(self.meta_key, mapping={k: v if isinstance(v, (str, int, float)) else json.dumps(v)
                                            for k, v in fields.items()})
        self.r.expire(self.meta_key, TTL)

    def stages(self) -> dict[str, dict]:
        return {k: json.loads(v) for k, v in self.r.hgetall(self.stages_key).items()}

    def stage(self, node_id: str) -> dict | None:
        raw = self.r.hget(self.stages_key, node_id)
        return json.loads(raw) if raw else None

    def update_stage(self, node_id: str, **fields: Any) -> None:
        current = self.stage(node_id) or {}
        current.update(fields)
        self.r.hset(self.stages_key, node_id, json.dumps(current))
        self.r.expire(self.stages_key, TTL)

    def mark_running(self) -> None:
        """PENDING -> RUNNING, once; never overwrites a final state."""
        self.r.eval("if redis.call('HGET', KEYS[1], 'status') == 'PENDING' then "
                    "redis.call('HSET', KEYS[1], 'status', 'RUNNING', 'started', ARGV[1]) end", 1,
                    self.meta_key, time.time())

    def cancel_requested(self) -> bool:
        return self.r.hget(self.meta_key, "cancel") == "1"

    def request_cancel(self) -> None:
        self.set(cancel="1")

    def failures(self) -> list[dict]:
        return [{"stage": s["stage"], "variant": s.get("variant"), "node": nid, "error": s.get("error")}
                for nid, s in self.stages().items() if s["state"] == "failed"]

    def finish(self, summary: dict) -> None:
        self.set(status=summary["status"], finished=time.time(), summary=summary)


def patiently(fn: Callable[[], T], what: str, patience: float = 300.0) -> T:
    """Call a Redis operation, waiting out a broker outage (a restart) for up to ``patience`` s,
    with exponential backoff and full jitter (tenacity)."""
    def say(retry_state: RetryCallState) -> None:
        log.warning("%s: broker unreachable (%s); retrying in %.1fs", what, retry_state.outcome.exception(),
                    retry_state.upcoming_sleep)

    retrying = Retrying(retry=retry_if_exception_type(BROKER_ERRORS), stop=stop_after_delay(patience),
                        wait=wait_random_exponential(multiplier=0.5, max=10.0), before_sleep=say, reraise=True)
    return retrying(fn)


class RedisLedger:
    """The run's ledger (``pipeline.engine.Ledger``) in Redis, for stages run by Celery workers:
    every read and write waits out a broker outage."""

    def __init__(self, state: RunState) -> None:
        self.state = state

    def stages(self) -> dict[str, dict]:
        return patiently(self.state.stages, "status")

    def update_stage(self, node_id: str, **fields: Any) -> None:
        patiently(lambda: self.state.update_stage(node_id, **fields), "status")

    def cancel_requested(self) -> bool:
        return patiently(self.state.cancel_requested, "status")

    def failures(self) -> list[dict]:
        return patiently(self.state.failures, "status")

    def finish(self, summary: dict) -> None:
        patiently(lambda: self.state.finish(summary), "status")

    def fail_run(self, status: str, error: str) -> None:
        patiently(lambda: self.state.set(status=status, finished=time.time(), error=error), "status")

    def ended(self) -> bool:
        return patiently(lambda: self.state.get("status"), "status") in FINAL_RUN_STATES
