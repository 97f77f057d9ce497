"""What exists under one key prefix: the queue registry and the keys found by ``SCAN``.

The operator commands (:mod:`celery_streams.admin`,
:mod:`celery_streams.deadletters`) start from an :class:`Inventory`: read once,
then every queue name an operator typed is checked against it before anything
changes. Keys are found with ``SCAN MATCH``, never ``KEYS``, and parsed by
:class:`~celery_streams.keys.Keys` alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import redis

from .errors import StreamsError
from .keys import FANOUT, SHARD_SEP, TASK, Keys, origin_of
from .slots import Client
from .wire import text

SCAN_COUNT = 1000


class UnknownQueue(StreamsError):
    """A queue named by the operator has neither a registry entry nor a stream."""


class BroadcastQueue(StreamsError):
    """A broadcast queue was named for a drain that leaves broadcast queues alone."""


@dataclass
class QueueKeys:
    """The keys of one queue found under the prefix (see :mod:`celery_streams.keys`)."""

    queue: str
    streams: dict[int, str] = field(default_factory=dict)   # priority bucket -> stream key
    dead_letters: str | None = None
    scheduled: str | None = None                             # its schedule (delayed delivery)
    alive: dict[str, str] = field(default_factory=dict)     # consumer -> liveness key

    @property
    def found(self) -> bool:
        """Whether the queue has a stream, dead letters or scheduled messages (liveness keys
        alone do not count)."""
        return bool(self.streams) or self.dead_letters is not None or self.scheduled is not None


def scan_keys(client: Client, pattern: str) -> list[str]:
    """Every key matching ``pattern``, each once, in a stable order."""
    return sorted({text(key) for key in client.scan_iter(match=pattern, count=SCAN_COUNT)})


def scan_queue_keys(client: Client, keys: Keys) -> dict[str, QueueKeys]:
    """Queue name -> its keys, for every queue with a key under the prefix (one SCAN)."""
    found: dict[str, QueueKeys] = {}
    for key in scan_keys(client, keys.match_queue_keys):
        info = keys.parse(key)
        if info is None:
            continue
        entry = found.setdefault(info.queue, QueueKeys(info.queue))
        if info.role == 'stream':
            entry.streams[info.detail] = key
        elif info.role == 'dead':
            entry.dead_letters = key
        elif info.role == 'scheduled':
            entry.scheduled = key
        elif info.role == 'alive':
            entry.alive[info.detail] = key
    return found


def registered_queues(client: Client, keys: Keys) -> dict[str, str]:
    """The queue registry: queue name -> kind (``task`` / ``fanout``)."""
    return {text(q): text(kind) for q, kind in client.hgetall(keys.queues).items()}


class Inventory:
    """The registry and the per-queue keys under one prefix, read once."""

    def __init__(self, client: Client, keys: Keys):
        self.keys = keys
        self.registry = registered_queues(client, keys)
        self.found = scan_queue_keys(client, keys)

    def kind(self, queue: str) -> str | None:
        return self.registry.get(queue)

    def queue_keys(self, queue: str) -> QueueKeys:
        return self.found.get(queue) or QueueKeys(queue)

    def streams(self, queue: str) -> list[str]:
        """The streams of ``queue``: bucket 0 (even if missing), then the priority buckets found."""
        buckets = dict(self.queue_keys(queue).streams)
        buckets.setdefault(0, self.keys.stream(queue))
        return [buckets[b] for b in sorted(buckets)]

    def all_queues(self) -> list[str]:
        """Registered queues plus every queue with a stream, dead letters or a schedule."""
        return sorted(set(self.registry) | {q for q, f in self.found.items() if f.found})

    def sharded(self, names: Iterable[str]) -> dict[str, list[str]]:
        """``names`` by the queue they belong to: each queue, then the shards found of it
        when it is sharded (:mod:`celery_streams.shards`, in shard order); a shard named
        stands for its queue. An operator sees and acts on a sharded queue as one."""
        found: dict[str, list[str]] = {origin_of(name): [origin_of(name)] for name in names}
        shards = [name for name in self.all_queues() if SHARD_SEP in name and origin_of(name) in found]
        for name in sorted(shards, key=shard_order):
            found[origin_of(name)].append(name)
        return found

    def with_dead_letters(self) -> list[str]:
        return sorted(q for q, f in self.found.items() if f.dead_letters)

    def check_known(self, names: Iterable[str]) -> list[str]:
        """``names`` without duplicates; raises :class:`UnknownQueue` for any never seen."""
        names = list(dict.fromkeys(names))
        unknown = [q for q in names
                   if q not in self.registry and not (q in self.found and self.found[q].found)]
        if unknown:
            raise UnknownQueue('unknown queue%s %s under prefix %r: no registry entry and no stream'
                               % ('s' if len(unknown) > 1 else '', ', '.join(map(repr, unknown)),
                                  self.keys.prefix))
        return names

    def select(self, names: Iterable[str] | None = None, include_broadcast: bool = False) -> list[str]:
        """The queues a drain works on.

        Without ``names``: every ``task`` queue of the registry (and ``fanout``
        ones with ``include_broadcast``). With ``names``: those queues; raises
        :class:`UnknownQueue`, or :class:`BroadcastQueue` for a broadcast queue
        without ``include_broadcast``.
        """
        if not names:
            wanted = (TASK, FANOUT) if include_broadcast else (TASK,)
            return sorted(q for q, kind in self.registry.items() if kind in wanted)
        names = self.check_known(names)
        broadcast = [q for q in names if self.kind(q) == FANOUT]
        if broadcast and not include_broadcast:
            raise BroadcastQueue('%s %s a broadcast queue; add --include-broadcast to drain it'
                                 % (', '.join(map(repr, broadcast)),
                                    'are' if len(broadcast) > 1 else 'is'))
        return names


def shard_order(name: str) -> tuple:
    """Sort key of shard names: by queue, then by suffix as a number."""
    queue, _, suffix = name.partition(SHARD_SEP)
    return (queue, int(suffix) if suffix.isdigit() else -1, suffix)


def stream_groups(client: Client, stream: str) -> list[dict]:
    """``XINFO GROUPS`` with text names; empty when the stream does not exist."""
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError as exc:
        if 'no such key' in str(exc).lower():
            return []
        raise
    return [dict(g, name=text(g['name'])) for g in groups]


def stream_info(client: Client, stream: str) -> dict:
    """``XINFO STREAM`` (payloads left as bytes); empty when the stream does not exist."""
    try:
        return client.execute_command('XINFO STREAM', stream, NEVER_DECODE=[])
    except redis.ResponseError as exc:
        if 'no such key' in str(exc).lower():
            return {}
        raise


def last_entry_id(client: Client, stream: str) -> str:
    """The id of the last entry ever added to ``stream`` (``0-0`` when there is none)."""
    return text(stream_info(client, stream).get('last-generated-id') or '0-0')


def server_now_ms(client: Client) -> int:
    """The server's clock (``TIME``), in ms: ages are measured with it, never the local one."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def age_seconds(entry_id: str, now_ms: int) -> float:
    """Seconds since the entry was added (the time part of its id), by the server's clock."""
    return round(max(now_ms - int(entry_id.split('-', 1)[0]), 0) / 1000, 3)
