"""Publishing: the priority bucket, direct/topic/fanout routing and the append paths.

* Through the default exchange (a queue name as routing key) a message is one
  ``XADD`` and the ``HINCRBY`` of its queue's ledger (and a ``PEXPIRE`` for a
  queue with ``x-expires``), packed by hand.
* Through a direct or topic exchange, the ``route`` script looks the bindings
  up and appends in one round trip.
* Through a fanout exchange, the message is copied into the stream of every
  bound queue, trimmed to ``fanout_maxlen`` (the ``append`` script).
* A message carrying a uniqueness key (:mod:`celery_streams.unique`) goes
  through the ``unique`` script instead, which checks the key and appends or
  schedules in one call per queue (a broadcast ignores the key).
* A message to a sharded queue (:mod:`celery_streams.shards`) goes to one of
  its shards: by its ``shard_key`` header, else round robin. A direct or topic
  exchange then routes in the client (the ``route`` script knows no shards).
* A Celery task whose ETA is further ahead than ``delayed_delivery_threshold``
  goes into each queue's schedule instead of its stream (delayed delivery,
  :mod:`celery_streams.scheduler`): the ``schedule`` script through the
  default exchange, the ``route`` script (given the due time) through a direct
  or topic exchange. Broadcasts are never scheduled.

Queues this process declared are created when missing: nothing published
before a worker declared its queue, or after a nuke, is lost. Queues known only
from bindings another process wrote (a reply queue, a broadcast queue)
receive a message only while their stream exists: a queue that expired or was
deleted leaves a stale binding, which is removed.

A publish returns once Redis replied (``publish_confirm='now'``, the default):
a message whose publish returned is in Redis. With ``publish_confirm='later'``
it returns once the message is written on a connection of its own
(:class:`~celery_streams.pipe.Pipe`); the replies are read by later publishes
(the older half once :data:`CONFIRM_WINDOW` are unread: one read for hundreds
of replies) and at the channel's close. A connection that drops before a reply is read gets the unconfirmed
messages written again (a duplicate, if one had run); one Redis refused is
logged and lost; what was written when the process died may be lost.
"""
from __future__ import annotations

import logging
from bisect import bisect
from fnmatch import fnmatchcase
from functools import partial

import redis
from kombu.utils.json import dumps
from redis.exceptions import NoScriptError

from . import errors, replication, scheduler, unique
from .keys import SEP, parse_binding

logger = logging.getLogger(__name__)

#: ``publish_confirm='later'``: publishes written whose replies are unread, beyond which
#: a publish reads the replies of the older half (about 0.5 MB of 300-byte messages kept
#: for a resend).
CONFIRM_WINDOW = 1000


class Publisher:
    """The publish side of one channel.

    Its collaborators: the channel's ``topology`` (the dispatcher publishes go
    through, the pipe of ``publish_confirm='later'``, following the master,
    whether the ``route`` script may run), the queue table and its bindings, the scripts,
    ``clock()`` (now, in ms by the server's clock) and ``shards`` (the shard a message
    to a sharded queue goes to). ``kombu`` is the kombu
    channel, for what kombu knows: exchange types and lookups, the dead-letter
    queue, a message's priority.
    """

    def __init__(self, *, kombu, topology, queues, bindings, scripts, keys, options, clock, shards):
        self.kombu = kombu
        #: The shards of sharded queues (:class:`celery_streams.shards.ShardTable`).
        self.shards = shards
        self.topology = topology
        self.dispatcher = topology.dispatcher
        self.queues = queues
        self.bindings = bindings
        self.scripts = scripts
        self.keys = keys
        self.options = options
        self.clock = clock
        #: The ``WAIT`` sent behind every write (``publish_wait_replicas``; with Sentinel, 1 by
        #: default), or None.
        self.wait = replication.for_publisher(self.options, topology)
        #: ``publish_confirm='later'``: the connection publishes are written on, replies read later.
        #: On a Redis Cluster, ``'later'`` is ``'now'``.
        self.pipe = (topology.open_publish_pipe(CONFIRM_WINDOW)
                     if self.options.publish_confirm == 'later' else None)
        #: How a direct or topic exchange routes: the ``route`` script, or, where a script
        #: touches one slot (a Redis Cluster), here.
        self.route_exchange = (self._route_in_script if topology.scripts_span_keys
                               else self._route_in_client)
        #: Publishes written without waiting that Redis refused (lost), since the channel opened.
        self.refused = 0

    def bucket(self, message) -> int:
        """The priority bucket of ``message`` (kombu: the step at or below its priority)."""
        steps = self.options.priority_steps
        return steps[bisect(steps, self.kombu._get_message_priority(message)) - 1]

    def put(self, queue, message, _publish_batch=None, **kwargs):
        """Append to the stream of a queue by name (created when missing), or schedule it."""
        claim = unique_claim(message)
        if claim is not None:
            return self.put_unique([queue], message, claim)
        route = self.shards.routes.get(queue)
        if route is not None:   # a sharded queue (celery_streams.shards): one of its shards
            queue = route.pick(message)
        self._write(self._put_commands([queue], message), _publish_batch)

    def put_unique(self, queues, message, claim) -> None:
        """Publish a message that carries a uniqueness key to each of ``queues``: the ``unique``
        script checks the key and appends (or schedules) in one call per queue.

        Always confirmed now, outside any batch: the caller learns at once
        whether it was dropped (:func:`celery_streams.unique.take_outcome`).
        """
        bucket, now_ms = self.bucket(message), self.clock()
        queues = [self.shards.pick(queue, message, claim.key) for queue in queues]   # one key, one shard
        payload = serialize(message, now_ms)
        due = scheduler.due_ms(message, now_ms, self.options)
        commands = [unique.publish_command(self.scripts, self.keys, queue, claim, payload=payload,
                                           bucket=bucket, due=due, token=scheduler.new_token(),
                                           expires=self.queues.expires(queue),
                                           ledger=self.options.ledger)
                    for queue in queues]
        if commands:
            self.run(commands, lambda replies: [unique.published(claim, r) for r in replies],
                     now=True)

    def _put_commands(self, queues, message) -> list:
        """The commands appending ``message`` to each of ``queues`` (created when missing), or
        scheduling it there."""
        bucket = self.bucket(message)
        now_ms = self.clock()
        payload = serialize(message, now_ms)
        due = scheduler.due_ms(message, now_ms, self.options)
        if due is not None:
            return [self._schedule_command(queue, bucket, due, payload, False) for queue in queues]
        return [command for queue in queues
                for command in _xadd(self.keys.stream(queue, bucket),
                                     self.keys.ledger(queue) if self.options.ledger else None,
                                     payload, self.queues.expires(queue))]

    def _schedule_command(self, queue, bucket, due, payload, if_exists) -> tuple:
        """Add a message due at ``due`` (ms) to the schedule of ``queue`` (the ``schedule`` script).

        ``if_exists``: only while the queue's main stream exists (a queue known
        from bindings only); the script answers None when it is gone.
        """
        return self.scripts.command('schedule', [self.keys.scheduled(queue), self.keys.stream(queue),
                                                 self.keys.ledger(queue)],
                                    [due, bucket, scheduler.new_token(), payload,
                                     '1' if if_exists else '0'])

    def _write(self, commands, batch=None, on_replies=None) -> None:
        """One publish's commands: buffered in ``batch``, or sent now.

        ``on_replies(replies)``: called once the commands ran (with
        ``publish_confirm='later'``, by a later publish).
        """
        if batch is not None:
            batch.add(commands, on_replies)
        else:
            self.run(commands, on_replies)

    def run(self, commands, on_replies=None, now=False) -> None:
        """Send ``commands`` in one write and check their replies, then ``on_replies(replies)``.

        ``publish_confirm='now'``: returns once Redis replied (with ``WAIT``
        behind them when publishes are confirmed by replicas), raising the
        first error in one line. ``'later'``: returns once they are written
        (:meth:`_confirmed` checks the replies); ``now``: as ``'now'`` whatever the option.
        """
        if self.pipe is not None and not now:
            self.pipe.write(commands, on_replies=partial(self._confirmed, commands, on_replies),
                            retry=False)
            return
        wait = self.wait
        replies = self.scripts.run(self.dispatcher, [*commands, wait.begin()] if wait else commands)
        confirmed = replies.pop() if wait else None
        failed = refusal(commands, replies)
        if isinstance(failed, redis.ResponseError):
            raise errors.translate_write_error(failed) from None
        if failed is not None:
            raise failed
        if wait:
            wait.confirm(confirmed)   # a master being replaced: MasterMoved, published again
        if on_replies is not None:
            on_replies(replies)

    def _confirmed(self, commands, on_replies, replies, tries=3) -> None:
        """The replies of commands written earlier (``publish_confirm='later'``).

        Commands refused with ``NOSCRIPT`` (a restart, ``SCRIPT FLUSH``) did
        not run: they are written again once the scripts are loaded. Any other
        error is logged, once per publish: that message is lost.
        """
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing and tries:
            try:
                self.scripts.reload_all()
            except errors.connection_errors:
                pass   # written again all the same: another NOSCRIPT costs one of the tries

            def again(new_replies):
                for i, reply in zip(missing, new_replies):
                    replies[i] = reply
                self._confirmed(commands, on_replies, replies, tries - 1)

            try:
                self.pipe.write([commands[i] for i in missing], on_replies=again)
            except errors.connection_errors:
                pass   # kept: the next publish writes them again
            return
        failed = refusal(commands, replies)
        if failed is not None:
            self.refused += 1
            logger.error('celery_streams: a publish written without waiting '
                         "(publish_confirm='later') was refused, the message is lost: %s",
                         errors.translate_write_error(failed)
                         if isinstance(failed, redis.ResponseError) else failed)
        elif on_replies is not None:
            try:
                on_replies(replies)
            except Exception as exc:   # noqa: BLE001 - an earlier publish's, not the caller's
                logger.error('celery_streams: a publish written without waiting could not be '
                             'routed on: %s', errors.one_line(exc))

    def close(self) -> None:
        """Read the replies of the publishes not yet confirmed (``publish_confirm='later'``);
        those of a connection the server closed are written again on a new one first."""
        if self.pipe is None or not self.pipe.unconfirmed:
            return
        try:
            self.pipe.collect(wait=True)
        except errors.connection_errors as exc:
            logger.warning('celery_streams: %d publish(es) written without waiting are not '
                           'confirmed, Redis may not have them: %s', self.pipe.unconfirmed, exc)

    def publish(self, message, exchange, routing_key, **kwargs):
        """Route one message through ``exchange`` and append it (kombu's ``basic_publish``)."""
        if not exchange:
            return self.put(routing_key, message, **kwargs)
        kind = self.kombu.typeof(exchange).type
        if kind == 'fanout':
            return self.put_fanout(exchange, message, routing_key, **kwargs)
        batch = kwargs.get('_publish_batch')
        claim = unique_claim(message)
        if claim is not None:   # routed here, each queue's key checked with its append
            queues = [q for q in dict.fromkeys(self.kombu._lookup(exchange, routing_key))
                      if q and q != self.kombu.deadletter_queue]
            return self.put_unique(queues, message, claim)
        if self.kombu.deadletter_queue:
            return self._put_declared(exchange, routing_key, message, batch)
        if self.shards.routes:   # the route script knows no shards
            return self._route_in_client(exchange, kind, routing_key, message, batch)
        return self.route_exchange(exchange, kind, routing_key, message, batch)

    def _route_in_script(self, exchange, kind, routing_key, message, batch=None):
        """Route through a direct or topic exchange with the ``route`` script: the bindings
        read and the message appended in one call; with no bindings in Redis, by this
        process's declarations."""
        route = self.scripts.command('route', [self.keys.bindings(exchange)],
                                     self._route_argv(exchange, kind, routing_key, message))

        def fall_back(replies):
            if replies[0] == -1:   # no bindings in Redis: route by this process's declarations
                self._put_declared(exchange, routing_key, message)   # now: a batch is flushing

        self._write([route], batch, on_replies=fall_back)

    def _route_in_client(self, exchange, kind, routing_key, message, batch=None):
        """Route through a direct or topic exchange on a Redis Cluster, where the bindings
        and the queues lie in different slots (the ``route`` script cannot run).

        The queues this process bound get the message in the same write as the
        ``SMEMBERS`` of the bindings (one round trip for Celery's ``send_task``);
        the queues other processes bound, once the bindings are read, while
        their streams exist. With no bindings in Redis, this process's are
        written back.
        """
        declared = self.bindings.declared(exchange)
        lookup = self.kombu.typeof(exchange).lookup
        here = sorted(lookup(declared, exchange, routing_key, None)) if declared else []
        bindings = ('SMEMBERS', self.keys.bindings(exchange))

        def route_others(replies):
            members = replies[0]
            if not members:
                if declared:
                    self.bindings.table(exchange)   # writes this process's bindings back
                return
            table = [parse_binding(member) for member in members]
            others = sorted(lookup(table, exchange, routing_key, None) - set(here))
            if others:
                self._append_elsewhere(exchange, others, message)

        shards = [self.shards.pick(queue, message) for queue in here]
        self._write([bindings, *self._put_commands(shards, message)], batch, on_replies=route_others)

    def _put_declared(self, exchange, routing_key, message, batch=None):
        """Route with kombu's lookup: to the queues this process declared (created when
        missing), and to the others only while they exist."""
        kombu = self.kombu
        declared_here = {queue for _, _, queue in self.bindings.declared(exchange)}
        queues = [q for q in kombu._lookup(exchange, routing_key) if q and q != kombu.deadletter_queue]
        for queue in queues:
            if queue in declared_here:
                self.put(queue, message, _publish_batch=batch)
        elsewhere = [q for q in queues if q not in declared_here]
        if elsewhere:
            self._append_elsewhere(exchange, elsewhere, message, batch)

    def _append_elsewhere(self, exchange, queues, message, batch=None):
        """Route to ``queues`` that other processes bound: each while it exists, but a
        sharded queue to one of its shards, created when missing (it is in the registry)."""
        routes = self.shards.routes
        sharded = [routes[q].pick(message) for q in queues if q in routes]
        if sharded:
            self._write(self._put_commands(sharded, message), batch)
        plain = [q for q in queues if q not in routes]
        if plain:
            self._append_if_exists(exchange, plain, message, self.bucket(message), 0,
                                   _publish_batch=batch)

    def _route_argv(self, exchange, kind, routing_key, message) -> list:
        declared = {queue: self.queues.expires(queue) or 0
                    for _, _, queue in self.bindings.declared(exchange)}
        now_ms = self.clock()
        due = scheduler.due_ms(message, now_ms, self.options)
        bucket, keys = self.bucket(message), self.keys
        return [kind, routing_key or '', serialize(message, now_ms), bucket, SEP,
                due or 0, scheduler.new_token() if due else '',
                *keys.stream_affixes(0), *keys.stream_affixes(bucket), *keys.scheduled_affixes(),
                *keys.ledger_affixes(),
                *[x for pair in declared.items() for x in pair]]

    def put_fanout(self, exchange, message, routing_key, **kwargs):
        """Copy a broadcast into the stream of every bound queue (priority bucket 0), trimmed.

        Never scheduled: a broadcast with an ETA is copied at once.
        """
        queues = [queue for bound_key, _, queue in self.bindings.table(exchange)
                  if fanout_matches(bound_key, routing_key)]
        if queues:
            self._append_if_exists(exchange, queues, message, 0, self.options.fanout_maxlen,
                                   schedule=False, **kwargs)

    def _append_if_exists(self, exchange, queues, message, bucket, maxlen, _publish_batch=None,
                          schedule=True, **kwargs):
        """Append (or schedule) to each of ``queues`` while its stream exists; bindings of
        the ones gone are removed."""
        now_ms = self.clock()
        payload = serialize(message, now_ms)
        due = scheduler.due_ms(message, now_ms, self.options) if schedule else None
        commands = [
            self._schedule_command(queue, bucket, due, payload, True) if due is not None else
            self.scripts.command('append', [self.keys.stream(queue, bucket), self.keys.ledger(queue)],
                                 [maxlen, payload, self.queues.expires(queue) or 0])
            for queue in queues]

        def drop_gone(replies):
            gone = {queue for queue, reply in zip(queues, replies) if reply is None}
            if gone:
                self.bindings.drop_stale(exchange, gone)

        self._write(commands, _publish_batch, on_replies=drop_gone)


def unique_claim(message) -> unique.Claim | None:
    """The uniqueness claim of a message (:mod:`celery_streams.unique`), or None: two
    lookups for a message without one."""
    headers, properties = message.get('headers'), message['properties']
    if (headers and unique.KEY in headers) or unique.KEY in properties:
        return unique.claim_of(headers, properties, give_id=True)
    return None


def refusal(commands, replies) -> Exception | None:
    """The error that refused a publish among the replies to its ``commands``, if any.

    The ledger's ``HINCRBY`` is not one: it runs after the ``XADD``, so when
    it is refused (the ``XADD`` filled Redis to ``maxmemory``) the message is
    in Redis all the same, only its count is missing (the audit lists that
    explanation). Saying "not published" there would make the caller publish
    it twice.
    """
    return next((reply for command, reply in zip(commands, replies)
                 if isinstance(reply, Exception) and command[0] != 'HINCRBY'), None)


def serialize(message, now_ms: float) -> str:
    """The stored form of kombu's envelope: its JSON, less the delivery tag.

    A tag names one delivery, so readers make their own; stored, it would
    only cost ~50 bytes per message. A message with an ``expiration`` (kombu's
    per-message TTL, Celery's ``expires``) carries its deadline, in ms since the
    epoch by the server's clock (``now_ms``), as ``x-deadline``: requeues and
    restores keep it.
    """
    properties = message['properties']
    properties.pop('delivery_tag', None)
    expiration = properties.get('expiration')
    if expiration is not None and 'x-deadline' not in message:
        try:
            message['x-deadline'] = int(now_ms + float(expiration))
        except (TypeError, ValueError):
            pass
    return dumps(message)


def fanout_matches(bound_key, routing_key) -> bool:
    """kombu Redis semantics: a binding key may be a pattern (``#`` and ``*``)."""
    if not bound_key or bound_key == '#':
        return True
    return fnmatchcase(routing_key or '', bound_key.replace('#', '*'))


def _xadd(key: str, ledger: str | None, payload: str, expires: int | None) -> list[tuple[str | int, ...]]:
    """The commands appending ``payload`` to stream ``key`` and counting it ``published`` in
    the queue's ``ledger`` (renewing the ``x-expires`` of both); None: no ledger (``ledger=False``).

    The publish hot path, packed without a script (a script costs Redis more
    CPU): the Python twin of ``append_payload`` in ``scripts/_library.lua``,
    through which every script appends. The ``HINCRBY`` follows the ``XADD`` in
    the same write: Redis runs them back to back (a write Redis refuses, full,
    refuses both; written again after a lost connection, both again).
    """
    commands: list[tuple[str | int, ...]] = [('XADD', key, '*', 'payload', payload)]
    if ledger is not None:
        commands.append(('HINCRBY', ledger, 'published', 1))
    if expires is not None:
        commands += [('PEXPIRE', key, expires)] + ([('PEXPIRE', ledger, expires)] if ledger else [])
    return commands
