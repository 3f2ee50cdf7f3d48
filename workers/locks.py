"""The stage lock: one computation per content key at a time, across every worker.

A duplicate delivery of a stage (a redelivered message, or another run that shares the key)
waits for the holder and then finds the result in the store instead of computing it again. The
lock is redis-py's ``Lock`` with the holder's ``hostname:task_id`` as its token, so the worker's
main process can free the lock of a pool process that died (``workers/deliveries.py``) without
waiting for it to expire. It expires QPIPE_LOCK_TTL s after its holder dies; a thread renews it
every QPIPE_LOCK_TTL / 4 s while the holder lives (redis-py's ``reacquire``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import redis
from redis.lock import Lock

from pipeline.settings import settings
from pipeline.stages.table import is_join
from workers.state import BROKER_ERRORS, patiently

log = logging.getLogger(__name__)
WAIT_STEP = 1.0  # seconds between a waiter's looks at the lock


def lock_ttl() -> int:
    """Seconds a stage lock outlives a holder that died (QPIPE_LOCK_TTL, default 60)."""
    return settings().lock_ttl


def lock_name(run_id: str, node: dict[str, Any]) -> str:
    """The stage lock of a node: per content key, and per run for the join (the report: not cached)."""
    return f"qpipe:lock:{node['stage']}:{run_id if is_join(node['stage']) else node['key']}"


def lock_owner(hostname: str, task_id: str) -> str:
    return f"{hostname}:{task_id}"


def _lock(client: redis.Redis, key: str, ttl: int) -> Lock:
    # thread_local=False: the renewing thread is not the one that took the lock
    return client.lock(key, timeout=ttl, sleep=WAIT_STEP, thread_local=False)


def release_lock(client: redis.Redis, key: str, owner: str) -> bool:
    """Free ``key`` only while ``owner`` holds it; False when someone else (or nobody) does."""
    try:
        _lock(client, key, lock_ttl()).do_release(owner)
    except redis.exceptions.LockNotOwnedError:
        return False
    return True


@contextlib.contextmanager
def stage_lock(client: redis.Redis, key: str, owner: str, on_wait: Callable[[], None]) -> Iterator[None]:
    """Hold ``key`` while a stage computes; ``on_wait()`` is called while another holder has it.
    A broker outage while waiting or renewing is waited out (``patiently``)."""
    ttl = lock_ttl()
    lock = _lock(client, key, ttl)
    if not patiently(lambda: lock.acquire(blocking=False, token=owner), "lock"):
        # once per delivery: says which path a duplicate took
        log.info("%s is held: the same stage is running elsewhere; waiting for it", key)
        on_wait()
        while not patiently(lambda: lock.acquire(blocking=True, blocking_timeout=5 * WAIT_STEP, token=owner),
                            "lock"):
            on_wait()
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl / 4):
            with contextlib.suppress(*BROKER_ERRORS, redis.exceptions.LockError):
                lock.reacquire()

    thread = threading.Thread(target=renew, name="qpipe-stage-lock", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        with contextlib.suppress(*BROKER_ERRORS, redis.exceptions.LockError):
            lock.release()
