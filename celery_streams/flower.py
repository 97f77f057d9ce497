"""Queue lengths in Flower: its Broker page and ``/api/queues/length``.

Flower picks a broker client by the URL's scheme and, for ``redis://``, counts
kombu's lists with ``LLEN``: it knows neither ``redis-streams://`` ("'redis'
broker is not supported") nor this transport's streams. Import this module
where Flower loads your app (the module of ``-A proj``, or a Flower config file
given with ``--conf``)::

    import celery_streams.flower  # noqa: F401

and Flower asks this transport instead, for ``redis-streams://`` and
``rediss-streams://`` URLs and for ``broker_transport =
'celery_streams.transport:Transport'``: a queue's length (``messages``, and
Ready) is the messages no worker received yet, over every priority bucket (as
``queue_declare(passive=True).message_count`` counts them); Unacked is what the
consumer group's workers hold, Consumers the live consumers (:func:`queue_rows`);
a sharded queue (:mod:`celery_streams.shards`) is one row, its shards' counts summed.
The Redis calls run in Flower's executor, off its event loop. Without Flower
installed, importing this module does nothing.
"""
from __future__ import annotations

import asyncio

from redis.exceptions import NoPermissionError

from .connection import SCHEMES, TRANSPORT_PATH, client_from_url, first_seed
from .depth import queue_counts
from .inventory import scan_queue_keys, shard_order, stream_groups
from .keys import FANOUT, SHARD_SEP, Keys, origin_of
from .options import Options
from .wire import text

try:
    from flower.utils import broker as flower_broker
except ImportError:   # pragma: no cover - Flower not installed: nothing to hook
    flower_broker = None


def redis_url(broker_url: str) -> str | None:
    """The ``redis-streams://`` form of a URL Flower got from kombu, or None if not ours."""
    scheme, sep, rest = broker_url.partition('://')
    if not sep:
        return None
    if scheme in SCHEMES:
        return broker_url
    if scheme == TRANSPORT_PATH:   # broker_transport set, with a redis:// URL
        return 'redis-streams://' + rest
    return None


def queue_rows(client, keys: Keys, group: str, names: list) -> list:
    """One row of Flower's Broker page per queue: ``messages`` (ready: what no worker received
    yet, as before), ``messages_ready``, ``messages_unacknowledged`` (held by ``group``'s
    consumers) and ``consumers`` (see :func:`live_consumers`); a sharded queue's over its shards."""
    found = scan_queue_keys(client, keys)
    members = {name: [name, *sorted((q for q in found if SHARD_SEP in q and origin_of(q) == name),
                                    key=shard_order)] for name in names}
    every = [member for name in names for member in members[name]]
    counts = dict(zip(every, queue_counts(client, keys, group, every)))
    consumers = live_consumers(client, keys, group, names, found)
    rows = []
    for name in names:
        ready, unacked = (sum(counts[m][i] for m in members[name]) for i in (0, 1))
        rows.append({'name': name, 'messages': ready, 'messages_ready': ready,
                     'messages_unacknowledged': unacked, 'consumers': consumers[name]})
    return rows


def live_consumers(client, keys: Keys, group: str, names: list, found=None) -> dict:
    """Queue -> its live consumers: those with a liveness key (found with one ``SCAN``, or in
    ``found``; on a sharded queue, on any shard), or, on a broadcast queue (whose consumers
    keep none), the consumers of ``group``."""
    found = scan_queue_keys(client, keys) if found is None else found
    alive: dict[str, set] = {name: set() for name in names}
    for queue, queue_keys in found.items():
        if origin_of(queue) in alive:
            alive[origin_of(queue)].update(queue_keys.alive)
    live = {name: len(alive[name]) for name in names}
    for name in broadcast_queues(client, keys, [name for name in names if not live[name]]):
        live[name] = sum(g['consumers'] for g in stream_groups(client, keys.stream(name))
                         if g['name'] == group)
    return live


def broadcast_queues(client, keys: Keys, names: list) -> list:
    """Those of ``names`` the registry says are broadcast queues (none when the user may not
    read the registry: the transport's own ACL allows no ``HMGET``)."""
    if not names:
        return []
    try:
        kinds = client.hmget(keys.queues, names)
    except NoPermissionError:
        return []
    return [name for name, kind in zip(names, kinds) if text(kind or '') == FANOUT]


if flower_broker is not None:
    class StreamsBroker(flower_broker.BrokerBase):
        """Flower's broker client for this transport: queue lengths from the streams."""

        def __init__(self, broker_url, *args, broker_options=None, broker_use_ssl=None, **kwargs):
            super().__init__(first_seed(broker_url))   # Flower parses one host, one port
            self.url = broker_url
            self.transport_options = dict(broker_options or {})
            self.ssl = broker_use_ssl

        async def queues(self, names):
            return await asyncio.get_running_loop().run_in_executor(None, self._lengths, list(names))

        def _lengths(self, names):
            options = Options.from_transport_options(self.transport_options)
            keys = Keys(options.global_keyprefix, options.priority_steps)
            client = client_from_url(self.url, ssl=self.ssl, transport_options=self.transport_options)
            try:
                return queue_rows(client, keys, options.consumer_group, names)
            finally:
                client.close()

    _flower_new = flower_broker.Broker.__new__

    def _broker(cls, broker_url, *args, **kwargs):
        ours = redis_url(broker_url)
        if ours is not None:
            return StreamsBroker(ours, *args, **kwargs)
        return _flower_new(cls, broker_url, *args, **kwargs)

    if getattr(flower_broker.Broker.__new__, '__module__', None) != __name__:
        flower_broker.Broker.__new__ = staticmethod(_broker)
