"""Sharded queues: one hot queue spread over several masters of a Redis Cluster.

Interface
---------
* Transport option ``sharded_queues``: queue name -> number of shards N >= 1,
  ``{'celery': 3}``. Written to Redis when a worker starts consuming (as
  ``rate_limits``); a bad value is one line of ``ConfigurationError``.
* Header ``shard_key``: ``task.apply_async(headers={'shard_key': k})`` sends
  every message of key ``k`` to one shard (``crc32(k) mod N``), in publish
  order. Without one: round robin per publisher (a uniqueness key, when the
  message has one, stands for it).
* CLI: ``celery streams shards list [--json]``, ``celery streams shards set QUEUE N``.
* Python: :func:`read` (queue -> :class:`Placement` ``(number, names)``:
  publishers use ``names[:number]``, consumers read all ``names``),
  :func:`set_count` (place and publish on N shards; returns the placement),
  :func:`origin_of` (the queue of a shard), :data:`HEADER`, :data:`SHARD_SEP`,
  :data:`REFRESH` (seconds between two reads of the registry by a channel).
* ``celery streams status --json``: a sharded queue is one entry, its counts
  summed, with ``shards``: each shard's counts. A delivery tag ends with the
  shard's name (``.../Q{S``).
* Names: shard 0 *is* queue ``Q`` (its keys as ever); shard ``i`` is the
  internal queue ``Q{S`` (:data:`~celery_streams.keys.SHARD_SEP`, a brace, which no
  queue name may hold, then a small integer ``S`` chosen so that the shard's
  hash tag lies on a master no earlier shard uses). The registry
  (:attr:`Keys.shards <celery_streams.keys.Keys.shards>`) keeps each queue's N
  and every shard name placed, so every client agrees.

How it works
------------
The registry holds, per sharded queue, ``{"count": N, "shards": [Q, Q{S1, ...]}``.
Publishers use the first N shards; consumers read every shard ever placed, so
lowering N loses nothing (the shards left out drain) and raising N adds shards
live (placed once, kept). A channel reads the registry when it opens, then
about every :data:`REFRESH` seconds from its renewal thread (never on a
publish or a read); the consume loop attaches the shards it learned of to
the queues it consumes (their groups, and kombu's callback of the queue).

Each shard is a queue in its own right: its streams, priority buckets,
schedule, dead letters, ledger, liveness and reclaim. Deliveries go to the
callback of ``Q``; the message's ``delivery_info`` is what the publisher
routed (``Q``). The operator commands fold shards into their queue by name
(:func:`origin_of`).

Ordering: an unsharded queue is FIFO; a sharded one orders only within a
shard (one ``shard_key``: one shard, in publish order, while N stays).
"""
from __future__ import annotations

import json
from itertools import count as counter
from time import monotonic
from typing import Callable, Iterable, Mapping, NamedTuple
from zlib import crc32

import redis

from . import errors, unique
from .depth import queue_depth
from .inventory import last_entry_id
from .keys import SHARD_SEP, Keys, origin_of, shard_name
from .options import MAX_SHARDS
from .scheduler import drain_schedule, plan_stamp
from .slots import Client, is_cluster, node_client

__all__ = ['HEADER', 'REFRESH', 'Placement', 'ShardTable', 'origin_of', 'read', 'set_count',
           'configure', 'shard_name', 'SHARD_SEP']

#: The message header that picks a shard: messages of one key go to one shard, in order.
HEADER = 'shard_key'
#: Seconds between two reads of the registry by a channel.
REFRESH = 1.0
#: Suffixes tried when placing a shard (a cluster has 16384 slots).
MAX_SUFFIX = 4096


class Placement(NamedTuple):
    """A sharded queue in the registry: publishers use the first ``number`` of ``names``
    (``names[0]`` is the queue itself), consumers read them all."""

    number: int
    names: tuple

    @property
    def publishing(self) -> tuple:
        return self.names[:self.number]

    def stored(self) -> str:
        return json.dumps({'count': self.number, 'shards': list(self.names)})


def parse_placement(queue: str, raw) -> Placement | None:
    """A registry value read back; None when it does not parse."""
    try:
        data = json.loads(raw)
        number, names = int(data['count']), tuple(str(n) for n in data['shards'])
    except (TypeError, ValueError, KeyError):
        return None
    if not names or names[0] != queue or number < 1:
        return None
    return Placement(min(number, len(names)), names)


def check_count(queue, number) -> int:
    """``number`` of shards for ``queue`` (a whole number from 1 to :data:`MAX_SHARDS`), or
    ConfigurationError."""
    if not isinstance(queue, str) or not queue or '{' in queue or '}' in queue:
        raise errors.ConfigurationError(
            'sharded queue %r: a queue name without braces is expected' % (queue,))
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= MAX_SHARDS:
        raise errors.ConfigurationError(
            'sharded queue %r: the number of shards must be a whole number from 1 to %d, not %r'
            % (queue, MAX_SHARDS, number))
    return number


# -- the registry ------------------------------------------------------------------------------

def read(client: Client, keys: Keys) -> dict[str, Placement]:
    """Every sharded queue in the registry (entries that do not parse are left out)."""
    found = {}
    for field, value in (client.hgetall(keys.shards) or {}).items():
        queue = _text(field)
        placement = parse_placement(queue, _text(value))
        if placement is not None:
            found[queue] = placement
    return found


def set_count(client: Client, keys: Keys, queue: str, number: int) -> Placement:
    """Publish ``queue`` on ``number`` shards: the shards missing are placed (on masters no
    other shard of it uses), the ones beyond it kept for consumers. Returns the placement."""
    check_count(queue, number)
    node = node_client(client, keys.shards)
    with node.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(keys.shards)
                raw = pipe.hget(keys.shards, queue)
                before = parse_placement(queue, _text(raw)) if raw is not None else None
                names = list(before.names if before else (queue,))
                while len(names) < number:
                    names.append(place(client, keys, queue, names))
                placement = Placement(number, tuple(names))
                if placement != before:
                    pipe.multi()
                    pipe.hset(keys.shards, queue, placement.stored())
                    pipe.execute()
                return placement
            except redis.WatchError:
                continue


def configure(client: Client, keys: Keys, wanted: Mapping[str, int]) -> None:
    """Write the ``sharded_queues`` option: each queue's count, where it differs."""
    current = read(client, keys) if wanted else {}
    for queue, number in wanted.items():
        if queue not in current or current[queue].number != number:
            set_count(client, keys, queue, number)


def place(client, keys: Keys, queue: str, names: list) -> str:
    """The name of the next shard of ``queue``: the first small suffix whose hash tag lies on
    the master that the shards in ``names`` use least (on one server: the next suffix)."""
    if not is_cluster(client):
        return next(shard_name(queue, i) for i in counter(1) if shard_name(queue, i) not in names)
    owner = _owner(client, keys)
    used: dict[str, int] = {node.name: 0 for node in client.get_primaries()}
    for name in names:
        used[owner(name)] = used.get(owner(name), 0) + 1
    least = min(used.values())
    best = None
    for i in range(1, MAX_SUFFIX):
        name = shard_name(queue, i)
        if name in names:
            continue
        load = used.get(owner(name), 0)
        if best is None or load < best[0]:
            best = (load, name)
        if load <= least:
            break
    assert best is not None
    return best[1]


def _owner(client, keys: Keys) -> Callable[[str], str]:
    return lambda name: client.get_node_from_key(keys.stream(name)).name


def masters(client: Client, keys: Keys, names: Iterable[str]) -> list:
    """The master (``host:port``) that holds each shard in ``names`` (None on one server)."""
    if not is_cluster(client):
        return [None for _ in names]
    owner = _owner(client, keys)
    return [owner(name) for name in names]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


# -- a channel's view ---------------------------------------------------------------------------

class Route:
    """How a publisher picks a shard of one queue: by ``shard_key``, else round robin."""

    __slots__ = ('names', 'number', '_turn')

    def __init__(self, names: tuple):
        self.names = names
        self.number = len(names)
        self._turn = counter()

    def pick(self, message, key=None) -> str:
        headers = message.get('headers')
        if headers:
            key = headers.get(HEADER, key)
        if key is None:
            return self.names[next(self._turn) % self.number]
        return self.names[crc32(str(key).encode()) % self.number]


class ShardTable:
    """A channel's copy of the registry: the routes its publisher uses, the shards its
    consumers read, refreshed about every :data:`REFRESH` seconds.

    Its collaborators: the channel's ``client``, ``keys``, the ``sharded_queues``
    option (``configured``: ``(queue, N)`` pairs), the queue table (``queues``:
    a shard is declared and consumed there) and kombu's ``callbacks`` (queue
    name -> callback: a shard's deliveries go to its queue's).
    """

    def __init__(self, client, keys: Keys, configured: Iterable, queues, callbacks):
        self.client = client
        self.keys = keys
        self.configured = dict(configured)
        self.queues = queues
        self.callbacks = callbacks
        #: Queue -> its :class:`Route`, for the queues published on more than one shard.
        self.routes: dict[str, Route] = {}
        #: Queue -> every shard placed, for the queues with more than one.
        self.placed: dict[str, tuple] = {}
        #: Queue -> the shards its consumer on this channel reads (the hub's thread).
        self.attached: dict[str, tuple] = {}
        self._configured_once = False
        self._looked = 0.0

    # -- learning -----------------------------------------------------------------------

    def refresh(self) -> None:
        """Read the registry now."""
        self._looked = monotonic()
        self.learn(read(self.client, self.keys))

    def tick(self) -> None:
        """From the renewal thread: read the registry when :data:`REFRESH` seconds passed."""
        if monotonic() - self._looked >= REFRESH:
            self.refresh()

    def learn(self, placements: Mapping[str, Placement]) -> None:
        """Take ``placements`` as the registry: new dicts, swapped whole (another thread reads)."""
        old = self.routes
        routes = {}
        for queue, placement in placements.items():
            names = placement.publishing
            if len(names) > 1:
                kept = old.get(queue)
                routes[queue] = kept if kept is not None and kept.names == names else Route(names)
        self.placed = {q: p.names for q, p in placements.items() if len(p.names) > 1}
        self.routes = routes

    def configure(self) -> None:
        """A consumer starts: write the ``sharded_queues`` option and read the registry again,
        once (then :meth:`tick` keeps it fresh)."""
        if self._configured_once:
            return
        self._configured_once = True
        if self.configured:
            configure(self.client, self.keys, self.configured)
        self.refresh()

    # -- publishing -----------------------------------------------------------------------

    def pick(self, queue: str, message, key=None) -> str:
        """The shard of ``queue`` to publish ``message`` to (``queue`` when not sharded)."""
        route = self.routes.get(queue)
        return queue if route is None else route.pick(message, key)

    # -- consuming ------------------------------------------------------------------------

    def names(self, queue: str) -> tuple:
        """Every shard of ``queue`` placed (``(queue,)`` when it has none)."""
        return self.placed.get(queue) or self.attached.get(queue) or (queue,)

    def expand(self, queues: Iterable[str]) -> list:
        """``queues`` with the shards attached to each, after it."""
        attached = self.attached
        if not attached:
            return list(queues)
        return [name for queue in queues for name in attached.get(queue, (queue,))]

    def sync(self, consuming: Iterable[str]) -> None:
        """On the consume loop's thread: attach the shards placed since, of the queues
        ``consuming`` (each consumed from now on, its deliveries to its queue's callback)."""
        placed = self.placed
        if not placed:
            return
        for queue in consuming:
            names = placed.get(queue)
            if names is not None and names != self.attached.get(queue):
                self.attach(queue, names)

    def attach(self, queue: str, names: tuple) -> None:
        record = self.queues[queue]
        for name in names:
            if name == queue or name in self.attached.get(queue, ()):
                continue
            self.queues.declare(name, internal=True)
            shard = self.queues[name]
            shard.expires, shard.message_ttl = record.expires, record.message_ttl
            self.queues.start_groups(name)
            shard.consumed, shard.no_ack = True, record.no_ack
            if queue in self.callbacks:
                self.callbacks[name] = self.callbacks[queue]
        self.attached = {**self.attached, queue: names}

    def detach(self, queue: str) -> tuple:
        """A consumer of ``queue`` was cancelled: its other shards, no longer read here."""
        names = tuple(n for n in self.attached.get(queue, ()) if n != queue)
        self.attached = {q: n for q, n in self.attached.items() if q != queue}
        for name in names:
            self.callbacks.pop(name, None)
        return names


# -- an operator's view -------------------------------------------------------------------------

def size(client, keys: Keys, group: str, names: Iterable[str]) -> int:
    """Messages no consumer received yet, over the shards ``names`` of one queue."""
    return sum(queue_depth(client, keys, group, name) for name in names)


def purge(client, scripts, keys: Keys, names: Iterable[str]) -> int:
    """Empty each shard in ``names`` up to its last entry now, and its schedule up to now, in
    bounded steps (groups stay); what goes releases its uniqueness keys. How many went."""
    removed = 0
    for queue in names:
        held = unique.held_prefix(client, keys, queue)
        removed += sum(scripts.drain_stream(key, last_entry_id(client, key), unique_prefix=held)[0]
                       for key in keys.streams(queue))
        key = keys.scheduled(queue)
        removed += drain_schedule(scripts, key, plan_stamp(node_client(client, key), key)[1],
                                  unique_prefix=held)
    return removed
