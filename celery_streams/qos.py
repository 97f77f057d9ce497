"""Delivery tags and the QoS of a channel: the read budget, acks and restores.

A delivery tag names the entry it was made for,
``"<entry id>/<consumer>/<priority bucket>/<queue>"``, so an ack works from any
channel and after a reconnect, and every delivered copy (a broadcast reaches
several queues) has its own tag.

Like kombu's Redis transport, the QoS owns the bookkeeping of what was
delivered: kombu's prefetch accounting, the *read budget* (how many messages
the next read may take), acks batched per turn of the consume loop (one call
of the ``ack`` script per stream -- ``XACK``, ``XDEL`` and the count of what
the ``XACK`` acked in the queue's ledger -- in one write, whose replies the
loop does not wait for: :mod:`celery_streams.pipe`) and restores (the
``restore`` script: an entry goes back only if it is still pending for its
reader, so an acked or drained message never returns).
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from functools import partial
from time import monotonic
from typing import NamedTuple

from kombu.transport import virtual
from redis.exceptions import NoScriptError, ResponseError

from . import errors, wire
from .lanes import Carried
from .unique import Holds
from .worker_state import running_delivery_tags

logger = logging.getLogger(__name__)

#: Messages read at once by a consumer without a prefetch limit (no_ack consumers).
UNLIMITED_BATCH = 100
#: Queued acks are sent at the latest when this many are waiting.
ACK_BATCH = 256
#: Seconds a busy consumer waits for half its prefetch window to come free
#: before it reads the free slots anyway (:meth:`QoS.refill_wait`).
REFILL_WAIT = 0.005


class Tag(NamedTuple):
    entry_id: str
    consumer: str
    bucket: int
    queue: str


def settle_commands(scripts, group: str, by_stream: dict, counter: str, ledger: bool) -> list:
    """The commands that settle delivered entries, one write for all.

    ``by_stream`` maps ``(stream, ledger key, '1' to delete or '0')`` to entry
    ids; ``group`` is '' for entries read with NOACK (nothing to ack). With the
    ledger: one ``ack`` script call per stream, counting what it settled in
    ``counter``; without: a plain ``XACK`` and ``XDEL``.
    """
    if ledger:
        return [scripts.command('ack', [stream, ledger_key], [group, counter, delete, *ids])
                for (stream, ledger_key, delete), ids in by_stream.items()]
    commands: list = []
    for (stream, _, delete), ids in by_stream.items():
        if group:
            commands.append(('XACK', stream, group, *ids))
        if delete == '1':
            commands.append(('XDEL', stream, *ids))
    return commands


def make_tag(entry_id: str, consumer: str, queue: str, bucket: int = 0) -> str:
    return '%s/%s/%d/%s' % (entry_id, consumer, bucket, queue)


def parse_tag(tag: str) -> Tag:
    entry_id, consumer, bucket, queue = tag.split('/', 3)
    return Tag(entry_id, consumer, int(bucket), queue)


class QoS(virtual.QoS):
    """kombu's prefetch accounting, with acks and restores sent to Redis.

    kombu builds it with the channel (``QoS(channel)``, on first use); it takes
    what it uses from the channel there: the keys, the consumer group, the
    scripts, the channel's ``dispatcher`` and ``pipe`` (acks written without
    waiting) and its topology's ``batches`` (restores in batches a script may
    run on). It asks the channel one thing later: whether it was ``collected``.
    """

    # kombu declares these None at class level and sets them in its __init__.
    _delivered: OrderedDict[str, virtual.Message]  # type: ignore[assignment]  # kombu: None until __init__
    _dirty: set[str]  # type: ignore[assignment]  # kombu: None until __init__

    def __init__(self, channel, prefetch_count=0):
        super().__init__(channel, prefetch_count)
        self._acks: deque = deque()   # tags acked by the app, not yet sent
        self._loop_thread = None      # the thread whose acks wait for the next turn
        self.keys = channel.keys
        self.group = channel.group
        self.scripts = channel.scripts
        self.dispatcher = channel.topology.dispatcher
        self.batches = channel.topology.batches
        self.pipe = channel.pipe
        #: The channel's inbox: the entries it read are counted ``delivered`` with the acks.
        self.inbox = channel.inbox
        #: Whether acks are counted in the ledger (the ``ack`` script) or not (``ledger=False``:
        #: a plain ``XACK`` and ``XDEL``).
        self.ledger = channel.options.ledger
        self._short_since = None      # since when fewer than half the window is free
        self._base_window = 0         # the smallest prefetch_count seen (refill_wait)
        #: The uniqueness keys of the messages delivered (:mod:`celery_streams.unique`).
        self.holds = Holds(keys=self.keys, scripts=self.scripts,
                           visibility_ms=channel.options.visibility_ms,
                           renew_every=channel.options.renew_every)
        self._releases: list = []     # commands releasing keys, sent with the next acks
        self._resend: list = []       # commands a read carried, lost with its connection

    # -- kombu's QoS ----------------------------------------------------------

    def append(self, message, delivery_tag):
        super().append(message, delivery_tag)
        self.holds.delivered(delivery_tag, message)

    def ack(self, delivery_tag):
        self._releases += self.holds.done(delivery_tag)
        self.ack_later(delivery_tag)
        super().ack(delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        if requeue:
            failed = self.restore_tags([delivery_tag], attempted=True)
            if failed:
                raise failed[0][1]
        else:
            self._releases += self.holds.done(delivery_tag)
            self.ack_tags([delivery_tag], counter='rejected')
        self._quick_ack(delivery_tag)

    def renew_unique(self) -> None:
        """From the renewal thread: renew or release the uniqueness keys of the messages
        this channel holds (:meth:`celery_streams.unique.Holds.tick`)."""
        self.holds.tick()

    def restore_unacked(self):
        """Put every unacked message back, in one round trip; return the failures.

        After a lost connection (the channel was collected), the tasks a
        Celery worker is still running stay delivered: their consumer keeps
        them alive and their acks are sent when they finish, so a connection
        blip never runs them twice.
        """
        self._flush()
        delivered = self._delivered
        messages = dict(delivered)
        delivered.clear()
        if self.channel.collected:
            running = running_delivery_tags()
            for tag in [tag for tag in messages if tag in running]:
                delivered[tag] = messages.pop(tag)
        failed = self.restore_tags(list(messages))
        away = [tag for tag, error in failed if isinstance(error, errors.connection_errors)]
        if away:   # not lost: still pending in Redis, taken over after visibility_timeout
            logger.warning('celery_streams: Redis is away; %d unacked message(s) stay pending and '
                           'are redelivered once this consumer\'s liveness lapses', len(away))
        return [(error, messages[tag]) for tag, error in failed
                if tag not in self._dirty and tag not in away]

    def holds_messages(self) -> bool:
        return bool(self.unacked_tags())

    def unacked_tags(self) -> list:
        """Tags delivered and not acked (kombu removes acked ones lazily, at its next flush)."""
        dirty = self._dirty
        return [tag for tag in list(self._delivered) if tag not in dirty]

    def held_queues(self) -> set:
        """The queues of the messages delivered and not yet acked."""
        return {parse_tag(tag).queue for tag in self.unacked_tags()}

    # -- the read budget ------------------------------------------------------

    def read_budget(self) -> int:
        """How many messages the next read may return (kombu's prefetch rules)."""
        if not self.can_consume():
            return 0
        if 'can_consume' in vars(self):
            # Celery's worker_disable_prefetch patched can_consume: one at a time.
            return 1
        estimate = self.can_consume_max_estimate()
        return UNLIMITED_BATCH if estimate is None else estimate

    def refill_wait(self, budget: int) -> float:
        """Seconds to hold back a read of ``budget`` free slots; 0: read now.

        A busy consumer refills its prefetch window once half of it is free,
        so that each read brings several messages instead of the one slot an
        ack just freed. Reads are one at a time per channel, so a worker
        reading slot by slot spends a round trip per task. Celery raises
        ``prefetch_count`` by one for each ETA task it holds, and those slots
        come free only when the tasks are due: "half" is of the smallest window
        seen. Fewer free slots are read after :data:`REFILL_WAIT` at the latest.
        """
        window = self.prefetch_count
        if window:
            # The smallest window seen: the one without ETA tasks, whose half can come free.
            window = self._base_window = min(self._base_window or window, window)
        if not window or budget * 2 >= window or 'can_consume' in vars(self):
            self._short_since = None
            return 0.0
        now = monotonic()
        if self._short_since is None:
            self._short_since = now
        wait = self._short_since + REFILL_WAIT - now
        if wait <= 0:
            self._short_since = None
            return 0.0
        return wait

    # -- acks -----------------------------------------------------------------

    def loop_turn(self, thread_ident=None) -> None:
        """Acks made on thread ``thread_ident`` wait for :meth:`flush_acks` (None: sent at once)."""
        self._loop_thread = thread_ident

    def ack_later(self, tag) -> None:
        """Queue an ack: the consume loop sends the queued acks once per turn.

        An ack from another thread (``-P threads``), or with no consume loop
        running, is sent at once. Until an ack reaches Redis the message is
        pending: a crash then means a redelivery, never a loss.
        """
        self._acks.append(tag)
        if threading.get_ident() != self._loop_thread or len(self._acks) >= ACK_BATCH:
            self.flush_acks()

    def has_acks(self) -> bool:
        return bool(self._acks)

    def flush_acks(self, wait=False, keep=()) -> bool:
        """Write the queued acks; read the replies that came (``wait``: all of them).

        ``keep``: the queues whose next read goes out soon (:attr:`Reader.carrying`): if
        every queued ack is of one of them, they wait and that read carries them
        (:meth:`carry`): one write, and one socket read for Redis, instead of two.
        Returns True if acks wait so.
        """
        if keep and not wait and self._carriable(keep):
            self.pipe.collect(False)
            return True
        tags = self._take_acks()
        if tags or self.inbox.uncounted or self._resend:
            self.ack_tags(tags, wait=wait)
        else:
            self.pipe.collect(wait)
        return False

    def carry(self, queues) -> Carried | None:
        """The queued acks (and the ``delivered`` counts of the last reads) as commands a read
        of ``queues`` writes before itself, or None: nothing queued, or something the read
        cannot carry (an ack of another queue, a uniqueness key's release: sent on the pipe).

        Until the read's reply comes, its acks are in flight: if its connection breaks,
        they are written again (:meth:`_carried_lost`).
        """
        if not self._carriable(queues):
            return None
        commands = self._ack_commands(self._take_acks(), 'acked')
        if not commands:
            return None
        return Carried(b''.join(map(wire.pack, commands)), len(commands),
                       partial(self._acked, commands), partial(self._carried_lost, commands))

    def _carriable(self, queues) -> bool:
        if self._releases or self._resend or not (self._acks or self.inbox.uncounted):
            return False
        return all(parse_tag(tag).queue in queues for tag in list(self._acks))

    def _carried_lost(self, commands) -> None:
        self._resend += commands

    def _take_acks(self) -> list:
        tags = []
        while True:
            try:
                tags.append(self._acks.popleft())
            except IndexError:
                return tags

    def ack_tags(self, tags, wait=True, counter='acked') -> None:
        """XACK and XDEL the entries of ``tags``, counted ``counter`` in their queue's ledger:
        one ``ack`` script call per stream, one write (with the ``delivered`` counts of the
        entries read since the last write: :meth:`Inbox.ledger_commands`).

        With ``wait`` it returns once Redis replied to them (and to every ack
        written before); else the replies are read by a later call.
        """
        commands = self._ack_commands(tags, counter)
        if self._resend:   # carried by a read whose connection broke: again (an ack again does nothing)
            resend, self._resend = self._resend, []
            commands = resend + commands
        if self._releases:   # in the acks' write: a key goes with its message
            releases, self._releases = self._releases, []
            commands += releases
        if not commands:
            self.pipe.collect(wait)
            return
        self.pipe.write(commands, wait=wait, on_replies=partial(self._acked, commands))

    def _ack_commands(self, tags, counter) -> list:
        by_stream: dict = {}
        for tag in map(parse_tag, tags):
            key = (self.keys.stream(tag.queue, tag.bucket), self.keys.ledger(tag.queue), '1')
            by_stream.setdefault(key, []).append(tag.entry_id)
        commands = settle_commands(self.scripts, self.group, by_stream, counter, self.ledger)
        return commands + self.inbox.ledger_commands()

    def _acked(self, commands, replies) -> None:
        """The replies of an ack write: commands refused with ``NOSCRIPT`` (the server lost its
        scripts) did not run and are written again once the scripts are loaded; the ledger's
        ``HINCRBY`` refused by a full Redis is let go (those reads stay uncounted); any other
        error is raised."""
        missing = [command for command, reply in zip(commands, replies)
                   if isinstance(reply, NoScriptError)]
        if missing:
            self.scripts.reload_all()   # the server lost them all (the ack and unique_hold)
            self.pipe.write(missing, wait=True, on_replies=partial(self._acked, missing))
            return
        error = next((reply for command, reply in zip(commands, replies)
                      if isinstance(reply, ResponseError) and command[0] != 'HINCRBY'), None)
        if error is not None:
            raise error

    # -- restores -------------------------------------------------------------

    def restore_tags(self, tags, attempted=False) -> list:
        """Put entries back at the tail of their stream, if still pending for their reader.

        ``attempted``: the consumer tried the message and gave up (a reject with
        requeue), so this delivery counts towards ``max_deliveries``; a message
        restored unstarted (at shutdown) keeps its count.
        Returns ``(tag, error)`` for the tags that could not be restored.
        """
        if not tags:
            return []
        try:
            self.flush_acks(wait=True)   # an acked message must never be restored
        except errors.connection_errors as exc:
            # Redis is away: nothing was put back. The entries stay pending for
            # this consumer and are taken over once its liveness lapses.
            return [(tag, exc) for tag in tags]
        # On a Redis Cluster, a batch per slot: a node that is gone keeps only its own.
        batches = self.batches(tags, lambda tag: self.keys.stream(parse_tag(tag).queue))
        failures = [failed for batch in batches for failed in self._restore(batch, attempted)]
        holds = self.holds.put_back(tags)   # waiting again: their keys held for unique_for
        if holds:
            try:
                self.scripts.run(self.dispatcher, holds)
            except errors.connection_errors as exc:   # lapse after their lease, at worst
                logger.debug('celery_streams: uniqueness keys not renewed at restore: %s', exc)
        return failures

    def _restore(self, tags, attempted) -> list:
        commands = [self.scripts.command('restore', [self.keys.stream(tag.queue, tag.bucket),
                                                     self.keys.ledger(tag.queue)],
                                         [self.group, tag.consumer, tag.entry_id, int(attempted)])
                    for tag in map(parse_tag, tags)]
        try:
            results = self._run_again_on_a_new_connection(commands)
        except errors.connection_errors as exc:
            return [(tag, exc) for tag in tags]
        return [(tag, result) for tag, result in zip(tags, results) if isinstance(result, Exception)]

    def _run_again_on_a_new_connection(self, commands) -> list:
        """Run ``commands``; on a connection error, once more on a new connection.

        A connection the server closed (``CLIENT KILL``, a restart) is found
        only by using it: a restore at reconnect would otherwise leave the
        prefetched messages pending until a reclaim, a visibility timeout later.
        The ``restore`` script puts an entry back only while it is pending for
        its reader, so running it twice never restores one twice.
        """
        try:
            return self.scripts.run(self.dispatcher, commands)
        except errors.connection_errors as exc:
            logger.debug('celery_streams: restore: %s; trying a new connection', exc)
            return self.scripts.run(self.dispatcher, commands)
