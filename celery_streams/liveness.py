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

from .cluster import by_slot
from .errors import one_line

logger = logging.getLogger(__name__)

#: Seconds between two prunings of the queue registry by a consuming channel.
PRUNE_EVERY = 600.0
#: Seconds until the next reclaim when the last one took a full budget.
RECLAIM_AGAIN = 0.1


class Liveness:
    """The liveness keys, reclaim runs and group membership of one channel (one consumer)."""

    def __init__(self, channel):
        self.channel = channel
        self.keys = channel.keys
        options = channel.options
        self.visibility_ms = int(options.visibility_timeout * 1000)
        self.reclaim_every = min(max(options.visibility_timeout / 4, 0.5), 60.0)
        self.renew_every = min(max(options.visibility_timeout / 3, 0.2), 60.0)
        self.alive_queues: frozenset = frozenset()
        self._lock = threading.Lock()   # renewal (its thread) against forget (close)
        self._forgotten = False
        self._ensured = None              # what ensure_alive last saw
        self._next_renew = 0.0
        self._next_reclaim = 0.0
        self._next_prune = monotonic() + PRUNE_EVERY

    def acked_queues(self) -> list:
        """The queues this channel consumes with acks."""
        queues = self.channel.queues
        return [q for q in dict.fromkeys(self.channel.consuming_queues())
                if not queues[q].no_ack and not queues.is_deleted(q)]

    def held_queues(self) -> set:
        """The queues this consumer holds or may hold messages of."""
        return set(self.acked_queues()) | self.channel.qos.held_queues()

    # -- renewal ------------------------------------------------------------------

    def tick(self) -> bool:
        """From the renewal thread, about every second: renew what is due.

        Liveness every third of ``visibility_timeout``; the expiry of consumed
        queues with an ``x-expires`` every third of it -- off the hub, so a full
        prefetch window or a long task under ``-P solo`` never lets a consumed
        queue expire. With Sentinel, where the master is: a channel follows a
        failover within about a second, even while the old master still takes
        writes (after ``SENTINEL FAILOVER`` it does so for about 10 s).
        """
        channel = self.channel
        if channel.closed and not channel.qos.holds_messages():
            self.forget()   # a held channel's last running task was acked
            return False
        if not channel.closed:
            channel.follow_master()
        now = monotonic()
        if now >= self._next_renew:
            self._next_renew = now + self.renew_every
            self.renew()
        if not channel.closed:
            channel.queues.refresh_expiry(channel.consuming_queues())
            channel.queues.retry_refused(channel.consuming_queues())
        return True

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
                name = self.channel.consumer_name
                with self.channel.pool_client.pipeline(transaction=False) as pipe:
                    for queue in queues:
                        pipe.set(self.keys.alive(queue, name), 1, px=self.visibility_ms)
                    for queue in released:   # one key a command: they lie in many slots
                        pipe.delete(self.keys.alive(queue, name))
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
        state = (tuple(self.channel.consuming_queues()), self.channel.queues.version, self.alive_queues)
        if state == self._ensured:
            return
        missing = [q for q in self.acked_queues() if q not in self.alive_queues]
        if missing:
            name = self.channel.consumer_name
            try:
                with self._lock:
                    if self._forgotten:
                        return
                    with self.channel.pool_client.pipeline(transaction=False) as pipe:
                        for queue in missing:
                            pipe.set(self.keys.alive(queue, name), 1, px=self.visibility_ms)
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
            self.channel.pool_client.delete(self.keys.alive(queue, self.channel.consumer_name))
            self.alive_queues -= {queue}

    def mark_alive(self, queue) -> None:
        """``basic_get`` took a message of ``queue``: alive there from now on."""
        if queue in self.alive_queues:
            return
        self.alive_queues |= {queue}   # renewed from now on by the renewer
        channel = self.channel
        try:
            channel.pool_client.set(self.keys.alive(queue, channel.consumer_name), 1,
                                    px=self.visibility_ms)
        except redis.ResponseError as exc:   # full Redis: the renewer retries
            logger.warning('celery_streams: could not renew liveness (%s)', one_line(exc))

    # -- leaving ------------------------------------------------------------------

    def forget(self) -> None:
        """At close: whatever this consumer still holds may be reclaimed at once."""
        with self._lock:
            self._forgotten = True
            if self.alive_queues:
                name = self.channel.consumer_name
                self.channel.pool_client.delete(*[self.keys.alive(q, name) for q in self.alive_queues])
                self.alive_queues = frozenset()

    def leave_groups(self, queues) -> None:
        """Remove this consumer from the groups it read, where it owns nothing any more."""
        channel = self.channel
        commands = [channel.scripts.command('forget_consumer', [stream],
                                            [channel.group, channel.consumer_name])
                    for queue in queues for stream in self.keys.streams(queue)]
        for reply in channel.scripts.run(channel.line, commands) if commands else ():
            if isinstance(reply, Exception):
                raise reply

    # -- reclaim --------------------------------------------------------------------

    def maybe_reclaim(self) -> None:
        """Every ``visibility_timeout / 4``: take over messages of dead consumers.

        They are buffered like a read, within the prefetch budget, and carry
        ``redelivered``. Runs between reads, never while one is outstanding.
        """
        channel = self.channel
        now = monotonic()
        if now < self._next_reclaim or channel.inbox or channel.reader.outstanding:
            return
        self._next_reclaim = now + self.reclaim_every
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY
            try:
                channel.queues.prune_registry(channel.scripts)
            except redis.ResponseError as exc:   # e.g. an ACL without HKEYS: consuming goes on
                logger.warning('celery_streams: pruning the queue registry failed: %s', one_line(exc))
        queues = self.acked_queues()
        budget = channel.qos.read_budget() if queues else 0
        if not budget:
            return
        pairs = [(queue, bucket) for bucket in channel.reader.bucket_order() for queue in queues]
        # A Redis Cluster runs a script on the keys of one slot: a call per slot there.
        claimed = []
        for slot_pairs in (by_slot(pairs, lambda pair: self.keys.stream(pair[0]))
                           if channel.address.cluster else [pairs]):
            try:
                claimed += channel.scripts.reclaim(
                    keys=[self.keys.stream(queue, bucket) for queue, bucket in slot_pairs],
                    args=[channel.group, channel.consumer_name, self.visibility_ms,
                          budget - len(claimed) // 4,
                          *[self.keys.alive_prefix(queue) for queue, _ in slot_pairs]])
            except redis.ResponseError as exc:   # e.g. an ACL without XCLAIM: consuming goes on
                logger.warning('celery_streams: reclaim failed: %s', one_line(exc))
                return
            if len(claimed) // 4 >= budget:
                break
        for queue, count in channel.inbox.add_claimed(claimed).items():
            logger.info('celery_streams: took over %d message(s) of queue %r from consumers '
                        'silent for more than visibility_timeout', count, queue)
        if len(claimed) // 4 >= budget:
            # The budget was the limit: a dead consumer may have left more. Look again as
            # soon as there is room, not a quarter of visibility_timeout later.
            self._next_reclaim = now + RECLAIM_AGAIN


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
