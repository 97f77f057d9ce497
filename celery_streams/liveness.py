"""Liveness and reclaim: at-least-once delivery when a consumer dies.

A consumer that holds messages says it lives with one key per queue
(``Keys.alive``), set for ``visibility_timeout`` and renewed every third of it
by :class:`Renewer`, a thread off the event hub (so a ``-P solo`` worker busy
in a long task still renews). Every ``visibility_timeout / 4`` a consumer runs
the ``reclaim`` script: it takes over, within the read budget, the pending
entries of consumers whose key lapsed, and forgets dead consumers that own
nothing. A clean close deletes the keys and leaves the groups at once.
"""
from __future__ import annotations

import logging
import threading
from time import monotonic

import redis

from .errors import one_line

logger = logging.getLogger(__name__)

#: Seconds between two prunings of the queue registry by a consuming channel.
PRUNE_EVERY = 600.0
#: Seconds until the next reclaim when the last one took a full budget.
RECLAIM_AGAIN = 0.1


class Liveness:
    """The liveness keys, reclaim runs and group membership of one channel (one consumer).

    Its collaborators: the channel's ``client`` and ``dispatcher``, the
    ``scripts``, the queue table, ``batches`` (the topology's: keys a script
    may touch together), ``consuming()`` (the queues the channel consumes now)
    and ``held()`` (the queues of the messages it holds, unacked).
    """

    def __init__(self, *, keys, options, consumer: str, client, dispatcher, scripts, queues,
                 batches, consuming, held):
        self.keys = keys
        self.group = options.consumer_group
        self.consumer = consumer
        self.client = client
        self.dispatcher = dispatcher
        self.scripts = scripts
        self.queues = queues
        self.batches = batches
        self.consuming = consuming
        self.held = held
        self.bucket_order = options.bucket_order
        self.visibility_ms = options.visibility_ms
        self.reclaim_every = options.reclaim_every
        self.renew_every = options.renew_every
        self.alive_queues: frozenset = frozenset()
        self._lock = threading.Lock()   # renewal (its thread) against forget (close)
        self._forgotten = False
        #: What ensure_alive last saw: (consumed queues, queue table version, alive queues).
        self._ensured: tuple[tuple[str, ...], int, frozenset[str]] | None = None
        self._next_renew = 0.0
        self._next_reclaim = 0.0
        self._next_prune = monotonic() + PRUNE_EVERY

    def acked_queues(self) -> list:
        """The queues this channel consumes with acks."""
        queues = self.queues
        return [q for q in dict.fromkeys(self.consuming())
                if not queues[q].no_ack and not queues.is_deleted(q)]

    def held_queues(self) -> set:
        """The queues this consumer holds or may hold messages of."""
        return set(self.acked_queues()) | self.held()

    # -- renewal ------------------------------------------------------------------

    def renew_if_due(self) -> None:
        """From the renewal thread: every third of ``visibility_timeout``, :meth:`renew`."""
        now = monotonic()
        if now >= self._next_renew:
            self._next_renew = now + self.renew_every
            self.renew()

    def renew(self) -> None:
        """Say this consumer lives, for ``visibility_timeout``, on every queue it holds.

        Called from the renewal thread and before the first read of a queue.
        """
        with self._lock:
            if self._forgotten:
                return
            queues = self.held_queues()
            released = self.alive_queues - queues   # cancelled, nothing held: liveness ends now
            if queues or released:
                with self.client.pipeline(transaction=False) as pipe:
                    for queue in queues:
                        pipe.set(self.keys.alive(queue, self.consumer), 1, px=self.visibility_ms)
                    for queue in released:   # one key a command: they lie in many slots
                        pipe.delete(self.keys.alive(queue, self.consumer))
                    pipe.execute()
            self.alive_queues = frozenset(queues)

    def ensure_alive(self) -> None:
        """Before a read: a consumed queue without a liveness key of this consumer gets one.

        Only those are written (a consumer of 100 queues, started queue by
        queue, wrote 5,050 keys when every call renewed all of them), and only
        when the consumed queues changed. When Redis refuses the write (full:
        ``maxmemory``), consuming goes on: without the key, this consumer's
        messages may be taken over once ``visibility_timeout`` passes -- a
        redelivery, never a loss.
        """
        state = (tuple(self.consuming()), self.queues.version, self.alive_queues)
        if state == self._ensured:
            return
        missing = [q for q in self.acked_queues() if q not in self.alive_queues]
        if missing:
            try:
                with self._lock:
                    if self._forgotten:
                        return
                    with self.client.pipeline(transaction=False) as pipe:
                        for queue in missing:
                            pipe.set(self.keys.alive(queue, self.consumer), 1, px=self.visibility_ms)
                        pipe.execute()
            except redis.ResponseError as exc:   # retried by the renewer thread
                logger.warning('celery_streams: could not renew liveness (%s); consuming goes on',
                               one_line(exc))
            self.alive_queues |= frozenset(missing)
        self._ensured = state[:2] + (self.alive_queues,)

    def release(self, queue) -> None:
        """The consumer of ``queue`` was cancelled: this consumer's liveness there ends now,
        unless it still holds messages of it (then the renewer ends it once it holds none).

        Only that key is deleted: renewing every queue at each cancel cost a
        worker on 100 queues 5,050 writes at shutdown.
        """
        with self._lock:
            if self._forgotten or queue not in self.alive_queues or queue in self.held_queues():
                return
            self.client.delete(self.keys.alive(queue, self.consumer))
            self.alive_queues -= {queue}

    def mark_alive(self, queue) -> None:
        """``basic_get`` took a message of ``queue``: alive there from now on."""
        if queue in self.alive_queues:
            return
        self.alive_queues |= {queue}   # renewed from now on by the renewer
        try:
            self.client.set(self.keys.alive(queue, self.consumer), 1, px=self.visibility_ms)
        except redis.ResponseError as exc:   # full Redis: the renewer retries
            logger.warning('celery_streams: could not renew liveness (%s)', one_line(exc))

    # -- leaving ------------------------------------------------------------------

    def forget(self) -> None:
        """At close: whatever this consumer still holds may be reclaimed at once."""
        with self._lock:
            self._forgotten = True
            if self.alive_queues:
                self.client.delete(*[self.keys.alive(q, self.consumer) for q in self.alive_queues])
                self.alive_queues = frozenset()

    def leave_groups(self, queues) -> None:
        """Remove this consumer from the groups it read, where it owns nothing any more."""
        commands = [self.scripts.command('forget_consumer', [stream], [self.group, self.consumer])
                    for queue in queues for stream in self.keys.streams(queue)]
        for reply in self.scripts.run(self.dispatcher, commands) if commands else ():
            if isinstance(reply, Exception):
                raise reply

    # -- reclaim --------------------------------------------------------------------

    def maybe_reclaim(self, read_budget, take_in) -> None:
        """Every ``visibility_timeout / 4``: take over messages of dead consumers.

        ``read_budget()`` is how many the prefetch window has room for;
        ``take_in(claimed)`` (the inbox's) buffers them like a read, and they
        carry ``redelivered``. The caller runs this between reads, never while
        one is outstanding.
        """
        now = monotonic()
        if now < self._next_reclaim:
            return
        self._next_reclaim = now + self.reclaim_every
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY
            try:
                self.queues.prune_registry()
            except redis.ResponseError as exc:   # e.g. an ACL without HKEYS: consuming goes on
                logger.warning('celery_streams: pruning the queue registry failed: %s', one_line(exc))
        queues = self.acked_queues()
        budget = read_budget() if queues else 0
        if not budget:
            return
        claimed = self._reclaim(queues, budget)
        for queue, count in take_in(claimed).items():
            logger.info('celery_streams: took over %d message(s) of queue %r from consumers '
                        'silent for more than visibility_timeout', count, queue)
        if len(claimed) // 4 >= budget:
            # The budget was the limit: a dead consumer may have left more. Look again as
            # soon as there is room, not a quarter of visibility_timeout later.
            self._next_reclaim = now + RECLAIM_AGAIN

    def _reclaim(self, queues, budget) -> list:
        """The ``reclaim`` script over the streams of ``queues`` (a call per slot on a Redis
        Cluster), within ``budget``: its flat reply, 4 items an entry."""
        pairs = [(queue, bucket) for bucket in self.bucket_order for queue in queues]
        claimed: list = []
        for batch in self.batches(pairs, lambda pair: self.keys.stream(pair[0])):
            try:
                claimed += self.scripts.reclaim(
                    keys=[self.keys.stream(queue, bucket) for queue, bucket in batch],
                    args=[self.group, self.consumer, self.visibility_ms, budget - len(claimed) // 4,
                          *[self.keys.alive_prefix(queue) for queue, _ in batch],
                          *[self.keys.ledger(queue) for queue, _ in batch]])
            except redis.ResponseError as exc:   # e.g. an ACL without XCLAIM: consuming goes on
                logger.warning('celery_streams: reclaim failed: %s', one_line(exc))
                break
            if len(claimed) // 4 >= budget:
                break
        return claimed


class Renewer:
    """A daemon thread that renews the liveness keys of every consuming channel.

    It runs off the hub's thread, so a worker busy in a long task (``-P solo``
    blocks its hub) still shows it lives and keeps its messages.
    """

    #: Seconds between two ticks; each channel decides what is due.
    EVERY = 1.0

    def __init__(self, poller, every=EVERY):
        self.poller = poller        # its renewed_channels() come and go
        self.every = every
        self._stopped = threading.Event()
        self._idle_stop = False
        self._thread = None

    def ensure_started(self) -> None:
        self._idle_stop = False
        if self._thread is None or not self._thread.is_alive():
            self._stopped.clear()
            self._thread = threading.Thread(target=self._run, name='celery-streams-renewer', daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def stop_when_idle(self) -> None:
        """Stop now, or once no held channel is left (the transport closed)."""
        self._idle_stop = True
        if not self.poller.held:
            self.stop()

    def _run(self) -> None:
        while not self._stopped.wait(self.every):
            for channel in self.poller.renewed_channels():
                try:
                    needed = channel.renewal_tick()
                except Exception as exc:   # Redis away: the consume loop reports it
                    logger.debug('celery_streams: liveness renewal failed: %s', exc)
                    continue
                if not needed and channel in self.poller.held:
                    self.poller.held.remove(channel)
            if self._idle_stop and not self.poller.held:
                self.stop()
