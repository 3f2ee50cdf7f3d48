"""Leases: how a crashed worker's stage comes back in minutes, not hours, while a live worker's
six-hour stage is never handed to a second worker.

With Redis as broker, a delivered but unacknowledged message sits in the ``unacked`` hash and
its delivery time in the ``unacked_index`` sorted set; every worker periodically moves messages
older than ``visibility_timeout`` back to their queue (kombu's ``restore_visible``). A fixed
timeout forces a bad choice: longer than the longest stage (a crash costs hours) or shorter
(a long stage runs twice).

qpipe renews instead: a thread in each worker's main process rewrites, every
``LEASE_INTERVAL`` seconds, the delivery time of every message that worker holds (reserved or
running) to "now", only where the entry still exists (``ZADD XX``). A live worker's messages
therefore never look older than one interval; a dead worker's stop being renewed and are
restored by the survivors once ``visibility_timeout`` has passed (default 300 s, swept every
``QPIPE_RESTORE_INTERVAL`` seconds).
"""

from __future__ import annotations

import logging
import threading
import time

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

log = logging.getLogger(__name__)
_stop = threading.Event()


def held_delivery_tags() -> list[str]:
    from celery.worker import state

    tags = []
    for req in list(state.reserved_requests) + list(state.active_requests):
        try:
            tags.append(req.message.delivery_tag)
        except AttributeError:
            continue
    return tags


def renew(client, index_key: str, tags: list[str]) -> int:
    if not tags:
        return 0
    now = time.time()
    return client.zadd(index_key, {tag: now for tag in tags}, xx=True, ch=True)


def _loop(app: Celery, interval: float) -> None:
    import redis

    opts = app.conf.broker_transport_options or {}
    index_key = opts.get("unacked_index_key", "unacked_index")
    client = redis.Redis.from_url(app.conf.broker_url, socket_timeout=10, socket_connect_timeout=5)
    while not _stop.wait(interval):
        try:
            renew(client, index_key, held_delivery_tags())
        except redis.RedisError as err:  # the broker is down: renew again when it is back
            log.warning("lease renewal failed: %s", err)


def install(app: Celery, interval: float) -> None:
    """Renew the leases of this worker's messages while it runs (call before worker_main)."""

    @worker_ready.connect(weak=False)
    def _start(sender=None, **_: object) -> None:
        _stop.clear()
        threading.Thread(target=_loop, args=(app, interval), name="qpipe-lease", daemon=True).start()

    @worker_shutdown.connect(weak=False)
    def _end(sender=None, **_: object) -> None:
        _stop.set()
