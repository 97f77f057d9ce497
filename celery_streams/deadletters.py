"""Dead letters: one record format, written by consumers, read and handled by operators.

A consumer moves an entry aside (:func:`write`) when it cannot be delivered:
undecodable, or delivered more than ``max_deliveries`` times. The record is an
entry of the queue's dead-letter stream (``Keys.dead_letters``)::

    reason    why it was moved aside
    queue     the queue it belonged to
    id        its entry id in its stream
    stream    that stream (a priority bucket of the queue)
    field:X   each field X of the original entry, as it was (bytes kept)

The operator side -- :func:`dead_letters` (list), :func:`requeue_dead_letters`
and :func:`purge_dead_letters` -- backs ``celery streams dead-letters`` and
reads the same format back (:func:`describe_dead_letter`).
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping

from kombu.utils.json import loads

from .slots import Client, by_node
from .errors import StreamsError
from .inventory import Inventory, age_seconds, last_entry_id, server_now_ms
from .keys import Keys, origin_of
from .scripts import Scripts, source
from .unique import release_of
from .wire import text as _text

logger = logging.getLogger(__name__)


class UnknownDeadLetter(StreamsError):
    """A dead-letter id named by the operator is in none of the selected dead-letter streams."""


class AmbiguousDeadLetter(StreamsError):
    """A bare dead-letter id named by the operator is in the dead letters of several queues."""


#: The full id of a stream entry (``<ms>-<seq>``).
ENTRY_ID = re.compile(r'\d+-\d+\Z')
FIELD = 'field:'
#: Entries read per XRANGE, and requeued per round trip.
PAGE = 500


def record(queue: str, stream: str, entry_id: str, fields: Mapping[str, Any], reason: str) -> dict:
    """The dead-letter entry of one stream entry (see the module docstring)."""
    entry = {'reason': reason, 'queue': queue, 'id': entry_id, 'stream': stream}
    for name, value in fields.items():   # a name that is not UTF-8 stays bytes
        entry[FIELD.encode() + name if isinstance(name, bytes) else FIELD + name] = value
    return entry


def write(client: Client, keys: Keys, group: str, queue: str, bucket: int, entry_id: str,
          fields: Mapping[str, Any], reason: str, *, maxlen: int, noack: bool = False) -> None:
    """Move one entry of a queue stream to the queue's dead letters, atomically.

    The entry is acked (unless it was read with ``NOACK``) and deleted from
    its stream in the same transaction, so it is never delivered again; the
    uniqueness key its message holds is released there too (:mod:`celery_streams.unique`).
    """
    logger.warning('celery_streams: moved entry %s of queue %r to its dead letters: %s',
                   entry_id, queue, reason)
    stream = keys.stream(queue, bucket)
    with client.pipeline(transaction=True) as pipe:
        pipe.xadd(keys.dead_letters(queue), record(queue, stream, entry_id, fields, reason),
                  maxlen=maxlen, approximate=True)
        if not noack:
            pipe.xack(stream, group, entry_id)
        pipe.xdel(stream, entry_id)
        pipe.hincrby(keys.ledger(queue), 'dead_lettered', 1)   # the ledger (celery_streams.ledger)
        released = _unique_release(keys, queue, fields)
        if released is not None:   # EVAL: a rare path, no script of a client's to run
            pipe.eval(source('unique_hold'), 1, *released)
        pipe.execute()


def _unique_release(keys: Keys, queue: str, fields: Mapping[str, Any]) -> tuple | None:
    """The release of the uniqueness key a dead-lettered entry's message holds, or None."""
    payload = fields.get('payload', fields.get(b'payload'))   # type: ignore[call-overload]
    try:
        message = loads(payload) if payload is not None else None
    except Exception:   # undecodable: it names no key
        return None
    return release_of(keys, queue, message) if isinstance(message, dict) else None


@dataclass
class DeadLetter:
    """One entry of a dead-letter stream, as :func:`write` wrote it."""

    queue: str
    id: str                          # the dead letter's own entry id
    age: float | None                # seconds since it was dead-lettered (server clock)
    reason: str | None
    source_stream: str | None        # the queue stream it came from (its ``stream`` field)
    source_id: str | None            # its entry id there
    task: str | None                 # headers.task of a Celery message, else None
    task_id: str | None              # headers.id of a Celery message, else None
    args: str | None                 # headers.argsrepr of a Celery message, else None
    kwargs: str | None               # headers.kwargsrepr of a Celery message, else None
    payload_size: int | None         # bytes of the payload; None when it has no payload field
    deliveries: int | None           # the ``deliveries`` field it carried, None when absent
    decodable: bool                  # the payload is a kombu message a worker can read
    fields: list[str] = field(default_factory=list)   # names of the original entry's fields

    @property
    def ref(self) -> str:
        """``QUEUE/ID``: what names it alone (ids are unique in one dead-letter stream only)."""
        return '%s/%s' % (self.queue, self.id)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class DeadLetterQueue:
    """The dead letters of one queue: the oldest first, at most ``limit`` of them."""

    queue: str
    stream: str                      # the dead-letter stream key
    count: int                       # XLEN of that stream: every dead letter, listed or not
    dead_letters: list[DeadLetter] = field(default_factory=list)

    @property
    def truncated(self) -> bool:
        return self.count > len(self.dead_letters)

    def as_dict(self) -> dict:
        return {'name': self.queue, 'stream': self.stream, 'count': self.count,
                'truncated': self.truncated,
                'dead_letters': [d.as_dict() for d in self.dead_letters]}


@dataclass
class RequeuedDeadLetter:
    """One dead letter :func:`requeue_dead_letters` moved back (or, in a dry run, would move)."""

    dead_letter: DeadLetter
    stream: str                      # the queue stream it goes back to
    fallback: bool                   # its record named no stream of its queue: the main stream
    outcome: str                     # 'requeued', 'would requeue', 'gone' (requeued or purged
                                     # meanwhile) or 'empty' (no original field: left in place)
    new_id: str | None = None        # id of the new entry in ``stream`` once requeued


@dataclass
class PurgedDeadLetters:
    """What :func:`purge_dead_letters` removed from one queue (or, in a dry run, would remove)."""

    queue: str
    stream: str                      # the dead-letter stream, deleted once empty
    removed: int
    until: str = '+'                 # the last dead letter the plan covers


def dead_letter_queues(client: Client, keys: Keys, queues: Iterable[str] | None = None) -> list[str]:
    """The queues a dead-letter command works on.

    Without ``queues``: every queue with a dead-letter stream (``SCAN``). With
    ``queues``: those, checked like :meth:`Inventory.check_known` (a known queue
    without dead letters is fine; a name never seen raises :class:`UnknownQueue`),
    a sharded queue with its shards (:mod:`celery_streams.shards`).
    """
    inventory = Inventory(client, keys)
    if not queues:
        return inventory.with_dead_letters()
    return [name for members in inventory.sharded(inventory.check_known(queues)).values()
            for name in members]


def dead_letters(client: Client, *, global_keyprefix: str = '',
                 queues: Iterable[str] | None = None, limit: int | None = None) -> list[DeadLetterQueue]:
    """The dead letters of ``queues`` (default: every queue that has some), oldest first.

    ``limit``: at most that many per queue (``None`` or 0: all); ``count`` is always the total.
    """
    keys = Keys(global_keyprefix)
    names = dead_letter_queues(client, keys, queues)
    now_ms = server_now_ms(client)
    result: dict[str, DeadLetterQueue] = {}
    for queue in names:   # the shards of a sharded queue in one (each letter names its shard)
        stream = keys.dead_letters(queue)
        entries = _read_entries(client, stream, limit or None)
        listed = result.setdefault(origin_of(queue), DeadLetterQueue(
            origin_of(queue), keys.dead_letters(origin_of(queue)), 0))
        listed.count += client.xlen(stream)
        listed.dead_letters += [describe_dead_letter(queue, entry_id, fields, now_ms)
                                for entry_id, fields in entries]
    for listed in result.values():
        if limit:
            del listed.dead_letters[limit:]
    return list(result.values())


def requeue_dead_letters(client: Client, *, global_keyprefix: str = '',
                         queues: Iterable[str] | None = None, ids: Iterable[str] | None = None,
                         dry_run: bool = False) -> list[RequeuedDeadLetter]:
    """Move dead letters back to the stream they came from, without their delivery count.

    ``queues`` as for :func:`dead_letters`; ``ids`` selects dead letters among
    those queues, each as ``QUEUE/ID`` or a bare ``ID`` (all of them must be
    found, each in one queue, or :class:`UnknownDeadLetter` /
    :class:`AmbiguousDeadLetter` is raised before anything changes). Each one goes to its ``stream`` field
    when that is a stream of its queue, else to the queue's main stream, with
    the original fields but ``deliveries``; then it is deleted from the
    dead-letter stream, atomically (the ``requeue_dead`` script). Undecodable
    entries are requeued too: a worker dead-letters them again.
    """
    keys = Keys(global_keyprefix)
    names = dead_letter_queues(client, keys, queues)
    now_ms = server_now_ms(client)
    selected = select_dead_letters(client, keys, names, ids)
    plan = []
    for queue, entry_id, fields in selected:
        letter = describe_dead_letter(queue, entry_id, fields, now_ms)
        stream, fallback = requeue_target(keys, queue, letter.source_stream)
        empty = not [f for f in letter.fields if f != 'deliveries']
        plan.append(RequeuedDeadLetter(letter, stream, fallback,
                                       'empty' if empty else 'would requeue'))
    return plan if dry_run else apply_requeue(client, plan, global_keyprefix=global_keyprefix)


def apply_requeue(client: Client, plan: list[RequeuedDeadLetter], *, global_keyprefix: str = '',
                  progress: Callable[[int], None] | None = None) -> list[RequeuedDeadLetter]:
    """Requeue the dead letters of a dry run's ``plan``: exactly those, none dead-lettered since.

    Sets each item's ``outcome`` (``requeued``, or ``gone`` when it was
    requeued or purged meanwhile) and ``new_id``; returns ``plan``.
    ``progress(n)`` is called after each round trip (:data:`PAGE` dead
    letters at most) with the dead letters it requeued.
    """
    keys = Keys(global_keyprefix)
    script = Scripts(client).requeue_dead
    todo = [item for item in plan if item.outcome != 'empty']
    # On a cluster, one pipeline per node: both keys of a call are of one queue (one slot).
    for node, items in by_node(client, todo, lambda item: keys.dead_letters(item.dead_letter.queue)):
        for start in range(0, len(items), PAGE):
            batch = items[start:start + PAGE]
            with node.pipeline(transaction=False) as pipe:
                for item in batch:
                    script(keys=[keys.dead_letters(item.dead_letter.queue), item.stream,
                                 keys.ledger(item.dead_letter.queue)],
                           args=[item.dead_letter.id], client=pipe)
                replies = pipe.execute()
            for item, reply in zip(batch, replies):
                item.outcome = _text(reply[0])
                item.new_id = _text(reply[1]) if len(reply) > 1 else None
            if progress is not None:
                progress(sum(item.outcome == 'requeued' for item in batch))
    requeued = [item for item in plan if item.outcome == 'requeued']
    if requeued:
        logger.info('celery_streams: requeued %d dead letters of %s', len(requeued),
                    ', '.join(repr(q) for q in dict.fromkeys(i.dead_letter.queue for i in requeued)))
    return plan


def purge_dead_letters(client: Client, *, global_keyprefix: str = '',
                       queues: Iterable[str] | None = None, dry_run: bool = False,
                       progress: Callable[[int], None] | None = None) -> list[PurgedDeadLetters]:
    """Delete the dead letters of ``queues`` (default: every queue that has some).

    Dead-letter streams have no consumer group: the ``drain`` script trims
    them up to the last dead letter planned (one dead-lettered after the plan
    stays), in bounded steps, and deletes a stream it emptied. ``progress``:
    see :func:`apply_purge`.
    """
    keys = Keys(global_keyprefix)
    plan = []
    for queue in dead_letter_queues(client, keys, queues):
        stream = keys.dead_letters(queue)
        until = last_entry_id(client, stream)
        plan.append(PurgedDeadLetters(queue, stream, client.xlen(stream), until))
    return plan if dry_run else apply_purge(client, plan, progress=progress)


def apply_purge(client: Client, plan: list[PurgedDeadLetters], *,
                progress: Callable[[int], None] | None = None) -> list[PurgedDeadLetters]:
    """Delete exactly the dead letters of ``plan``; returns what was removed.

    In bounded steps (:meth:`Scripts.drain_stream`: at most ``DRAIN_STEP``
    entries trimmed per script call); ``progress(n)`` is called after each
    step with the dead letters it removed.
    """
    scripts = Scripts(client)
    done = []
    for planned in plan:
        until = planned.until if planned.until != '+' else last_entry_id(client, planned.stream)
        removed, _ = scripts.drain_stream(planned.stream, until, delete_empty=True,
                                          progress=progress)
        done.append(PurgedDeadLetters(planned.queue, planned.stream, removed, planned.until))
    if done:
        logger.info('celery_streams: purged %d dead letters of %d queues',
                    sum(p.removed for p in done), len(done))
    return done


def requeue_target(keys: Keys, queue: str, source_stream: str | None) -> tuple[str, bool]:
    """``(stream, fallback)``: where a dead letter of ``queue`` goes back to.

    Its recorded source stream when that is a stream (any priority bucket) of
    the same queue under this prefix; otherwise the queue's main stream, with
    ``fallback`` True. Never another queue's key, so one script call stays in
    one hash slot.
    """
    if source_stream:
        parsed = keys.parse(source_stream)
        if parsed is not None and parsed.queue == queue and parsed.role == 'stream':
            return source_stream, False
    return keys.stream(queue), True


def describe_dead_letter(queue: str, entry_id: str, fields: Mapping, now_ms: int) -> DeadLetter:
    """A :class:`DeadLetter` from the raw fields of a dead-letter entry (bytes or text)."""
    record = {_decode(k): v for k, v in fields.items()}
    original = {name[len(FIELD):]: value for name, value in record.items() if name.startswith(FIELD)}
    payload = original.get('payload')
    task = task_id = args = kwargs = None
    try:
        envelope = loads(payload)
        decodable = isinstance(envelope['properties'], dict)
    except Exception:
        envelope, decodable = None, False
    headers = envelope.get('headers') if isinstance(envelope, dict) else None
    if isinstance(headers, dict):
        task, task_id = _text_or_none(headers.get('task')), _text_or_none(headers.get('id'))
        args, kwargs = _text_or_none(headers.get('argsrepr')), _text_or_none(headers.get('kwargsrepr'))
    try:
        deliveries = int(original['deliveries'])
    except (KeyError, TypeError, ValueError):
        deliveries = None
    return DeadLetter(
        queue=queue, id=entry_id, age=age_seconds(entry_id, now_ms),
        reason=_decode_or_none(record.get('reason')),
        source_stream=_decode_or_none(record.get('stream')),
        source_id=_decode_or_none(record.get('id')),
        task=task, task_id=task_id, args=args, kwargs=kwargs,
        payload_size=None if payload is None else len(_bytes(payload)),
        deliveries=deliveries, decodable=decodable, fields=list(original))


def select_dead_letters(client: Client, keys: Keys, queues: list[str],
                         refs: Iterable[str] | None) -> list[tuple[str, str, dict]]:
    """``(queue, dead-letter id, raw fields)`` of the selected dead letters, in stream order.

    ``refs``: ``QUEUE/ID`` or a bare ``ID``, looked up among ``queues``. A
    dead-letter id is unique in its stream only: a bare id found in several
    queues raises :class:`AmbiguousDeadLetter`, one found nowhere
    :class:`UnknownDeadLetter` (before anything changes).
    """
    if not refs:
        return [(queue, entry_id, fields) for queue in queues
                for entry_id, fields in _read_entries(client, keys.dead_letters(queue))]
    wanted = parse_refs(refs)
    found: dict[tuple[str, str], dict] = {}
    missing, ambiguous = [], []
    for ref, (named, entry_id) in wanted.items():
        hits = [(queue, fields) for queue in queues if named in (None, queue)
                for _, fields in _xrange(client, keys.dead_letters(queue), entry_id, entry_id)]
        if not hits:
            missing.append(ref)
        elif len(hits) > 1:
            ambiguous.append((entry_id, [queue for queue, _ in hits]))
        else:
            found[(hits[0][0], entry_id)] = hits[0][1]
    if missing:
        raise UnknownDeadLetter('no dead letter %s in the dead letters of %s' % (
            ', '.join(map(repr, missing)),
            'queue%s %s' % ('s' if len(queues) > 1 else '', ', '.join(map(repr, queues)))
            if queues else 'any queue under prefix %r' % keys.prefix))
    if ambiguous:
        raise AmbiguousDeadLetter(_ambiguous_message(ambiguous))
    order = {queue: n for n, queue in enumerate(queues)}
    return [(queue, entry_id, found[(queue, entry_id)])
            for queue, entry_id in sorted(found, key=lambda k: (order[k[0]], _id_key(k[1])))]


def parse_refs(refs: Iterable[str]) -> dict[str, tuple[str | None, str]]:
    """``QUEUE/ID`` or ``ID`` -> ``(queue or None, id)``, without duplicates; one line for bad ones."""
    wanted = {}
    for ref in dict.fromkeys(r.strip() for r in refs):
        queue, slash, entry_id = ref.rpartition('/')
        wanted[ref] = (queue if slash else None, entry_id)
    malformed = [ref for ref, (queue, entry_id) in wanted.items()
                 if queue == '' or not ENTRY_ID.match(entry_id)]
    if malformed:
        raise UnknownDeadLetter('not a dead-letter id: %s (expected [QUEUE/]<milliseconds>-<sequence>, '
                                'as `dead-letters list` shows)' % ', '.join(map(repr, malformed)))
    return wanted


#: Ids an ambiguity error names in full; the rest are counted.
AMBIGUOUS_SHOWN = 3


def _ambiguous_message(ambiguous: list[tuple[str, list[str]]]) -> str:
    shown = ['%s (in queues %s)' % (entry_id, ', '.join(map(repr, queues)))
             for entry_id, queues in ambiguous[:AMBIGUOUS_SHOWN]]
    if len(ambiguous) > AMBIGUOUS_SHOWN:
        shown.append('and %d more' % (len(ambiguous) - AMBIGUOUS_SHOWN))
    entry_id, queues = ambiguous[0]
    return ('dead-letter id%s in several queues: %s; name the queue as QUEUE/ID (e.g. %s/%s) '
            'or with -Q' % ('s' if len(ambiguous) > 1 else '', ', '.join(shown), queues[0], entry_id))


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split('-')
    return int(ms), int(seq)


def _read_entries(client: Client, stream: str, limit: int | None = None) -> list[tuple[str, dict]]:
    """The entries of ``stream``, oldest first, at most ``limit``, read in pages."""
    entries: list[tuple[str, dict]] = []
    start = '-'
    while limit is None or len(entries) < limit:
        count = PAGE if limit is None else min(PAGE, limit - len(entries))
        page = _xrange(client, stream, start, '+', count)
        entries += page
        if len(page) < count:
            break
        ms, seq = page[-1][0].split('-')
        start = '%s-%d' % (ms, int(seq) + 1)   # the next possible id ('(' needs Redis 6.2)
    return entries


def _xrange(client: Client, stream: str, start: str, end: str,
            count: int | None = None) -> list[tuple[str, dict]]:
    """XRANGE without decoding the fields: a payload need not be UTF-8."""
    args = ['XRANGE', stream, start, end] + (['COUNT', count] if count else [])
    return [(_text(entry_id), fields or {})
            for entry_id, fields in client.execute_command(*args, NEVER_DECODE=[])]


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _decode(value: Any) -> str:
    return value.decode('utf-8', 'backslashreplace') if isinstance(value, bytes) else str(value)


def _decode_or_none(value: Any) -> str | None:
    return None if value is None else _decode(value)


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)
