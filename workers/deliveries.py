"""Deliveries that die: how a stage that kills its process every time it runs ends FAILED
instead of being handed back to its queue forever.

With ``acks_late`` and ``reject_on_worker_lost`` (``workers/app.py``), a stage whose process
dies without a word (the kernel's OOM killer, a segfault in native code) goes back to its queue,
which is what lets a stage killed once resume elsewhere. Without a bound, a stage that dies on
every delivery keeps its run RUNNING and holds a worker for good.

qpipe counts, per stage and content key, the deliveries that began and never ended under
control. A delivery increments ``qpipe:deliveries:{stage}:{key}`` once it holds the stage lock
(so at most one living delivery is ever counted, and a duplicate waiting for the lock is not)
and deletes it at every end it controls: done, cached, failed, cancelled, or a retry. What is
left in the counter when the next delivery takes the lock is the number of deliveries in a row
that died; at ``QPIPE_MAX_DELIVERIES`` that delivery fails the stage with the cause instead of
running it. The count is kept in Redis, not in the message: a redelivered message is the same
message, and the process that would have counted is dead.

The cause is known only to the worker's main process: it sees billiard's ``WorkerLostError``
("Worker exited prematurely: signal 9 (SIGKILL)") for the pool process it lost. The stage tasks
use ``Request`` below (Celery's per-task ``Request`` class), which records that status in a hash
next to the counter before the message goes back to the queue. When the whole worker dies (its
pod evicted or OOM-killed as a unit), no cause is recorded, but the death still counts. The main
process also frees the stage lock the dead process held, so the redelivery need not wait
``QPIPE_LOCK_TTL`` for it to expire.
"""

from __future__ import annotations

import functools
import logging
import re

import redis
from billiard.einfo import ExceptionWithTraceback
from celery.exceptions import WorkerLostError
from celery.worker.request import Request as CeleryRequest

log = logging.getLogger(__name__)
TTL = 7 * 24 * 3600  # longer than any redelivery chain; a counter nobody clears does not stay
_STATUS = re.compile(r"prematurely: (.+?)(?: Job: \d+)?\.?$")


class Deliveries:
    """The counter and the recorded causes of one stage's content key."""

    def __init__(self, client: redis.Redis, stage: str, key: str) -> None:
        self.r = client
        self.counter = f"qpipe:deliveries:{stage}:{key}"
        self.causes_key = f"{self.counter}:causes"

    def begin(self) -> int:
        """Count this delivery; return how many before it died without a controlled end."""
        started, _ = self.r.pipeline().incr(self.counter).expire(self.counter, TTL).execute()
        if started == 1:  # a first delivery: a cause recorded for a loss that was not counted goes
            self.r.delete(self.causes_key)
        return int(started) - 1

    def end(self) -> None:
        """This delivery ended under control: the deaths before it no longer run in a row."""
        self.r.delete(self.counter, self.causes_key)

    def record_loss(self, status: str) -> None:
        self.r.pipeline().hincrby(self.causes_key, status, 1).expire(self.causes_key, TTL).execute()

    def causes(self) -> dict[str, int]:
        return {k if isinstance(k, str) else k.decode(): int(v) for k, v in self.r.hgetall(self.causes_key).items()}


def explain(died: int, causes: dict[str, int], limit: int) -> str:
    """Why a stage is not run again, with the recorded signals and what to try."""
    def times(n: int) -> str:
        return f"on {n} deliver{'y' if n == 1 else 'ies'}"

    told = [f"{'was killed by' if status.startswith('signal') else 'exited with'} {status} {times(n)}"
            for status, n in sorted(causes.items(), key=lambda kv: -kv[1])]
    unknown = died - sum(causes.values())
    if unknown > 0:
        told.append(f"was lost with its whole worker (no cause recorded) {times(unknown)}")
    text = f"the worker process {', '.join(told)} (QPIPE_MAX_DELIVERIES={limit}); not run again"
    if any("SIGKILL" in s for s in causes) or unknown > 0:
        text += ("; out of memory? give the worker more memory, or make the stage smaller "
                 "(finetune.batch_size, a qat variant's batch_size, data.image_size)")
    if any(sig in s for s in causes for sig in ("SIGSEGV", "SIGBUS", "SIGILL", "SIGABRT")):
        text += "; a crash in native code (torch, a runtime): the worker's log shows what it was running"
    return text


def worker_status(exc: BaseException) -> str:
    """'signal 9 (SIGKILL)' out of "Worker exited prematurely: signal 9 (SIGKILL) Job: 0."."""
    match = _STATUS.search(str(exc))
    return match.group(1) if match else str(exc)


@functools.cache
def _client(url: str) -> redis.Redis:
    # the main process's event loop waits on this call: a short timeout, never a long stall
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, decode_responses=True)


class Request(CeleryRequest):
    """A stage task's request in the worker's main process: records why its pool process died."""

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, WorkerLostError):  # recorded before the message goes back to the queue
            from workers.locks import lock_name, lock_owner, release_lock

            try:
                run_id, node = self.args[0], self.args[1]
                client = _client(self.task.app.conf.broker_url)
                Deliveries(client, node["stage"], node["key"]).record_loss(worker_status(exc))
                # the dead process held the stage lock: free it now, so the redelivery starts at
                # once instead of waiting QPIPE_LOCK_TTL for the lock to expire
                release_lock(client, lock_name(run_id, node), lock_owner(self.hostname, self.id))
            except (redis.RedisError, LookupError, TypeError) as err:  # the loss still counts, unexplained
                log.warning("could not record why %s[%s] was lost: %s", self.name, self.id, err)
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
