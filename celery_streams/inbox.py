"""What a read brought in: decoding entries into kombu messages, the buffer, no-ack settling.

A read (or a reclaim) returns a batch of entries. Each one is decoded on its
own: a bad entry is moved to the dead letters (:mod:`celery_streams.deadletters`)
and never affects the others; one over ``max_deliveries`` too; an expired one
(``x-message-ttl``, a message ``expiration``) is dropped, as AMQP does. The
rest wait in the buffer, tagged for this consumer, until the QoS lets them be
handed over. Entries of no-ack consumers (Celery's pidbox) are settled -- acked
and deleted -- as soon as they are read.

The ledger (:mod:`celery_streams.ledger`): settling and dropping go through the
``ack`` script, which counts ``acked`` / ``expired`` by what it settled. What
the reads of consumers with acks bring in is counted ``delivered`` here, and
written with the QoS's next acks (:meth:`Inbox.ledger_commands`): the
blocking ``XREADGROUP`` is no script, and the ``read`` script is not given the
ledgers' keys. No-ack consumers (Celery's remote control, replies, events)
count nothing delivered: their entries are counted acked as they are read.
"""
from __future__ import annotations

import logging
from collections import deque
from time import monotonic

from kombu.utils.json import loads

from . import deadletters, unique
from .errors import one_line
from .worker_state import worker_shutting_down
from .qos import make_tag, settle_commands
from .wire import text

logger = logging.getLogger(__name__)

#: While handing over a batch, queued acks are sent once this many seconds passed.
ACK_DELAY = 0.005


class Inbox:
    """The messages one channel read and has not handed over yet.

    Its collaborators: the queue table (what a queue is: no-ack, broadcast,
    message TTL, healed marks), the ``client`` dead-lettering entries, the
    ``scripts`` and ``dispatcher`` settling them, ``clock()`` (now, in ms by the server's clock) and
    ``decode_body`` (kombu's, to refuse a body kombu could not decode later).
    """

    def __init__(self, *, keys, queues, options, consumer: str, client, scripts, dispatcher, clock,
                 decode_body, throttle=None):
        self.keys = keys
        self.queues = queues
        self.group = options.consumer_group
        self.max_deliveries = options.max_deliveries
        self.dead_letter_maxlen = options.dead_letter_maxlen
        self.ledger = options.ledger
        self.consumer = consumer
        self.client = client
        self.clock = clock
        self.decode_body = decode_body
        self.buffer: deque = deque()   # (queue, payload)
        self.scripts = scripts
        self.dispatcher = dispatcher
        #: Queue -> entries read (delivered), not yet counted in its ledger.
        self.uncounted: dict = {}
        #: The global rate limits (:class:`celery_streams.limits.Throttle`), or None.
        self.throttle = throttle

    def __bool__(self) -> bool:
        return bool(self.buffer)

    def __len__(self) -> int:
        return len(self.buffer)

    def pop(self):
        """The oldest buffered ``(queue, payload)``."""
        return self.buffer.popleft()

    # -- taking entries in ------------------------------------------------------

    def add_reply(self, replies, noack) -> int:
        """Decode what a read returned (XREADGROUP or script shape) into the buffer.

        Entries a global rate limit holds (:mod:`celery_streams.limits`) go to
        the throttle: the ones it admits join the buffer, the others wait in
        their queue's schedule. Returns how many entries the reply held.
        """
        settle: list = []
        limited: list = []
        read = sum(len(entries) for _, entries in replies)
        throttle = None if noack or not read else self._throttle()   # an empty read asks nothing
        for stream, entries in replies:
            queue, bucket = self.keys.parse_stream(text(stream))
            record = self.queues.get(queue)
            # A no-ack consumer's entries are counted acked as they are read (settle_noack).
            count = self.ledger and not (record is not None and record.no_ack)
            for entry_id, fields in entries:
                entry_id = text(entry_id)
                if isinstance(fields, list):   # the script's raw reply
                    fields = dict(zip(fields[::2], fields[1::2]))
                if count:
                    self.uncounted[queue] = self.uncounted.get(queue, 0) + 1
                payload = self.decode(queue, entry_id, fields, noack, bucket=bucket)
                if payload is None:
                    continue
                if record is not None and record.no_ack:
                    settle.append((queue, bucket, entry_id))
                elif self._limited(throttle, limited, queue, bucket, entry_id, payload, fields):
                    continue
                self.buffer.append((queue, payload))
        if settle:
            self.settle_noack(settle, noack)
        if limited and throttle is not None:
            self.buffer.extend(throttle.admit(limited))
        return read

    def add_claimed(self, claimed) -> dict:
        """Decode the flat reply of the ``reclaim`` script; returns entries taken per queue."""
        taken: dict = {}
        throttle = self._throttle()
        limited: list = []
        for i in range(0, len(claimed), 4):
            queue, bucket = self.keys.parse_stream(text(claimed[i]))
            entry_id, times, flat = text(claimed[i + 1]), int(claimed[i + 2]), claimed[i + 3]
            fields = dict(zip(flat[::2], flat[1::2]))
            payload = self.decode(queue, entry_id, fields, noack=False, times_in_pel=times,
                                  bucket=bucket)
            taken[queue] = taken.get(queue, 0) + 1
            if payload is not None and not self._limited(throttle, limited, queue, bucket,
                                                         entry_id, payload, fields):
                self.buffer.append((queue, payload))
        if limited and throttle is not None:
            self.buffer.extend(throttle.admit(limited))
        return taken

    def _throttle(self):
        """The throttle, when any rate limit exists (looked up at most once a second)."""
        return self.throttle if self.throttle is not None and self.throttle.look() else None

    def _limited(self, throttle, limited, queue, bucket, entry_id, payload, fields) -> bool:
        """Whether a rate limit holds this entry: then it joins ``limited``, for the throttle
        (an entry reclaimed from a dead consumer too: it may never have been asked)."""
        held = () if throttle is None else throttle.limits_of(queue, payload, _paced_at(fields))
        if held:
            limited.append((queue, bucket, entry_id, payload, held))
        return bool(held)

    def decode(self, queue, entry_id, fields, noack, times_in_pel=1, bucket=0):
        """The kombu payload of one entry, or None once a bad entry was dead-lettered.

        ``times_in_pel`` is the group's delivery count of this entry id (1 for a
        fresh read); ``deliveries`` carries the count of earlier entries of the
        same message (requeues, restores). Whatever its bytes, an entry is
        either returned as a message kombu can build, or dead-lettered.
        """
        raw = dict(fields or {})
        try:
            fields = {_field_name(k): v for k, v in raw.items()}
            payload, deliveries, deadline = self._check(fields)
        except Exception as exc:
            problem = 'missing field %s' % exc if isinstance(exc, KeyError) else one_line(exc)
            self.dead_letter(queue, bucket, entry_id, raw, 'undecodable entry: %s' % problem, noack)
            return None
        properties = payload['properties']
        delivery_info = properties.setdefault('delivery_info', {})
        delivered = deliveries + times_in_pel
        max_deliveries = self.max_deliveries
        if delivered > max_deliveries and not noack:
            self.dead_letter(queue, bucket, entry_id, raw,
                             'delivered %d times, more than max_deliveries=%d'
                             % (delivered, max_deliveries), noack)
            return None
        if self._expired(queue, entry_id, payload, deadline):   # dropped, as AMQP does
            self.settle_noack([(queue, bucket, entry_id)], noack, counter='expired')
            unique.release_expired(self, queue, payload)   # its uniqueness key, if any
            return None
        properties['delivery_tag'] = make_tag(entry_id, self.consumer, queue, bucket)
        # What a task reads from ``request.delivery_info`` to guard its side effects
        # (docs/guarantees.md, "Telling a redelivery"): whether it came before, how
        # many times, and the entry id, the same for every delivery of one entry.
        delivery_info['redelivered'] = bool(
            delivered > 1 or fields.get('redelivered')
            or self.queues.healed_before(self.keys.stream(queue, bucket), entry_id))
        delivery_info['delivery_count'] = delivered
        delivery_info['entry_id'] = entry_id
        return payload

    def _check(self, fields):
        """``(payload, deliveries, deadline)`` of an entry, or an error saying what is wrong."""
        payload = loads(fields['payload'])
        if not isinstance(payload, dict) or not isinstance(payload.get('properties'), dict):
            raise ValueError('not a kombu message (no properties)')
        properties = payload['properties']
        if not isinstance(properties.get('delivery_info', {}), dict):
            raise ValueError('delivery_info is not a mapping')
        if not isinstance(payload.get('headers') or {}, dict):
            raise ValueError('headers are not a mapping')
        body = payload.get('body')
        if body:   # what kombu's Message does with it, so that cannot fail later
            self.decode_body(body, properties.get('body_encoding'))
        deliveries = int(fields.get('deliveries') or 0)
        deadline = payload.get('x-deadline')
        if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float))):
            raise ValueError('x-deadline is not a number: %r' % (deadline,))
        return payload, deliveries, deadline

    def _expired(self, queue, entry_id, payload, deadline) -> bool:
        """Past the queue's ``x-message-ttl`` or the message's deadline, by the server's clock.

        A Celery task is never dropped for its deadline (``expires``): the
        worker that receives it marks it REVOKED, so its result does not wait
        for ever.
        """
        now_ms = self.clock()
        record = self.queues.get(queue)
        if record is not None and record.message_ttl is not None:
            if now_ms - int(entry_id.split('-', 1)[0]) > record.message_ttl:
                return True
        return bool(deadline) and now_ms > deadline and not _is_celery_task(payload)

    def dead_letter(self, queue, bucket, entry_id, fields, reason, noack=False) -> None:
        deadletters.write(self.client, self.keys, self.group, queue, bucket, entry_id,
                          fields, reason, maxlen=self.dead_letter_maxlen, noack=noack)

    def settle_noack(self, settled, noack, counter='acked') -> None:
        """Ack (unless read with NOACK) and delete entries of no-ack consumers, counting them
        ``counter`` in their ledger: one write (:func:`~celery_streams.qos.settle_commands`)."""
        by_stream: dict = {}
        for queue, bucket, entry_id in settled:
            broadcast = self.queues.is_broadcast(queue)
            if noack and broadcast:
                continue   # nothing to ack, nothing to delete: trimmed with the others
            key = (self.keys.stream(queue, bucket), self.keys.ledger(queue), '0' if broadcast else '1')
            by_stream.setdefault(key, []).append(entry_id)
        commands = settle_commands(self.scripts, '' if noack else self.group, by_stream, counter,
                                   self.ledger)
        if commands:
            failed = next((r for r in self.scripts.run(self.dispatcher, commands)
                           if isinstance(r, Exception)), None)
            if failed is not None:
                raise failed

    def ledger_commands(self) -> list:
        """The ``HINCRBY`` commands counting the entries read since the last call (written
        with the QoS's acks)."""
        uncounted, self.uncounted = self.uncounted, {}
        commands: list = []
        for queue, n in uncounted.items():
            if self.queues.is_deleted(queue):
                continue   # its ledger went with it: never made again
            ledger = self.keys.ledger(queue)
            commands.append(('HINCRBY', ledger, 'delivered', n))
            expires = self.queues.expires(queue)
            if expires is not None:   # the queue's x-expires: a reply queue leaves nothing behind
                commands.append(('PEXPIRE', ledger, expires))
        return commands

    # -- handing over -----------------------------------------------------------

    def deliver(self, qos, deliver, limit=None) -> bool:
        """Hand buffered messages to their consumers (``deliver(payload, queue)``: kombu's)
        while ``qos`` allows. True if any."""
        delivered, first_error, started = 0, None, monotonic()
        buffer = self.buffer
        while buffer and (limit is None or delivered < limit) and qos.can_consume():
            if worker_shutting_down():
                break   # a blocking pool (solo) may have run one: the rest go back at close
            if qos.has_acks() and monotonic() - started > ACK_DELAY:
                qos.flush_acks()   # callbacks that run tasks (-P solo): acks go out between them
                started = monotonic()
            queue, payload = buffer.popleft()
            try:
                deliver(payload, queue)
            except Exception as exc:   # deliver the rest, then report
                first_error = first_error or exc
            delivered += 1
        if first_error is not None:
            raise first_error
        return bool(delivered)

    def take_back(self, only_queue=None) -> list:
        """Messages read but never handed to a consumer (cancelled, or the channel closes):
        out of the buffer; the delivery tags to restore."""
        # Changed in place: a delivery loop may be iterating this very deque.
        returned = [item for item in self.buffer if only_queue in (None, item[0])]
        kept = [item for item in self.buffer if only_queue not in (None, item[0])]
        self.buffer.clear()
        self.buffer.extend(kept)
        tags = []
        for queue, payload in returned:
            record = self.queues.get(queue)
            if not (record and record.no_ack):
                tags.append(payload['properties']['delivery_tag'])
        return tags


def _paced_at(fields) -> int | None:
    """The start a rate limit reserved for an entry it held (``paced``: limits.py), or None."""
    start = fields.get(b'paced') or fields.get('paced')
    try:
        return int(start) if start else None
    except ValueError:
        return None


def _field_name(name):
    """A field name as text; one that is not UTF-8 makes the entry undecodable."""
    return name.decode() if isinstance(name, bytes) else name


def _is_celery_task(payload) -> bool:
    headers = payload.get('headers') or {}
    return 'task' in headers and 'id' in headers
