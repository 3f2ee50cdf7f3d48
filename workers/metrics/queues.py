"""``qpipe_queue_messages`` and ``qpipe_worker_info``, computed when the worker is scraped.

kombu has no public call for how many messages a Redis queue holds: ``queue_declare(passive=True)``
refuses a queue whose list does not exist yet (an empty one), and opens a channel per scrape;
nothing public counts delivered but unacknowledged messages. So the depth is read from Redis
directly, and this module is the one place that knows kombu's layout. The layout is taken from
the kombu in use (``kombu.transport.redis.Channel``: the priority steps, their separator and the
``unacked`` hash) rather than copied, and tests/test_metrics.py checks it against that kombu
(the key of every priority, and a message reserved by a real kombu consumer).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)


def queue_keys(queue: str) -> list[str]:
    """The Redis lists kombu keeps ``queue`` in: one per priority step (the first is the queue's name)."""
    from kombu.transport.redis import Channel

    return [queue if step == 0 else f"{queue}{Channel.sep}{step}" for step in Channel.priority_steps]


class WorkerCollector:
    """``qpipe_worker_info`` and ``qpipe_queue_messages``, computed when scraped.

    waiting: length of the queue's Redis lists (:func:`queue_keys`);
    reserved: messages delivered to a worker and not yet acknowledged, i.e. the entries of kombu's
    ``unacked`` hash whose routing key is the queue (qpipe binds each queue under its own name).
    """

    def __init__(self, broker_url: str, *, node: str, queues: Iterable[str], pool: str,
                 all_queues: Iterable[str] = ("cpu", "gpu"), unacked_key: str = "unacked",
                 timeout: float = 1.0) -> None:
        self.node = node
        self.queues = ",".join(queues)
        self.pool = pool
        self.all_queues = tuple(all_queues)
        self.unacked_key = unacked_key
        self._url = broker_url
        self._timeout = timeout
        self._client: Any = None

    def _redis(self) -> Any:
        if self._client is None:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            self._client = redis.Redis.from_url(self._url, socket_timeout=self._timeout,
                                                socket_connect_timeout=self._timeout, retry=Retry(NoBackoff(), 0))
        return self._client

    def queue_depths(self) -> dict[tuple[str, str], int]:
        """{(queue, "waiting"|"reserved"): count}; raises redis errors when the broker is down."""
        pipe = self._redis().pipeline(transaction=False)
        keys = {q: queue_keys(q) for q in self.all_queues}
        for q in self.all_queues:
            for key in keys[q]:
                pipe.llen(key)
        pipe.hvals(self.unacked_key)
        *lengths, unacked = pipe.execute()
        depths = {}
        counts = iter(lengths)
        for q in self.all_queues:
            depths[(q, "waiting")] = sum(next(counts) for _ in keys[q])
            depths[(q, "reserved")] = 0
        for raw in unacked:  # kombu stores [message, exchange, routing_key]
            try:
                routing_key = json.loads(raw)[2]
            except (ValueError, IndexError, TypeError):
                continue
            if (routing_key, "reserved") in depths:
                depths[(routing_key, "reserved")] += 1
        return depths

    def collect(self) -> Iterable[Any]:
        import redis
        from prometheus_client.core import GaugeMetricFamily

        info = GaugeMetricFamily("qpipe_worker_info", "1 per running worker, with what it serves.",
                                 labels=["node", "queues", "pool"])
        info.add_metric([self.node, self.queues, self.pool], 1.0)
        yield info
        try:
            depths = self.queue_depths()
        except (redis.RedisError, OSError) as err:  # the broker is down: leave the samples out
            log.debug("queue depth not collected: broker unreachable (%s)", type(err).__name__)
            self._client = None
            return
        family = GaugeMetricFamily("qpipe_queue_messages", "Messages in the broker per queue: waiting in the "
                                   "queue, or reserved by a worker and not yet acknowledged.",
                                   labels=["queue", "state"])
        for (q, state), count in sorted(depths.items()):
            family.add_metric([q, state], float(count))
        yield family
