"""Where a key lives on a Redis Cluster: its slot, its node, and work grouped by either.

Pure helpers over redis-py (nothing of the package): the operator functions
(:mod:`celery_streams.admin`, :mod:`celery_streams.deadletters`) take a plain
``redis.Redis`` or a redis-py ``RedisCluster`` alike, and the channel's
cluster wiring (:mod:`celery_streams.topology`) groups its commands by slot.

Most of what the operator functions send works unchanged on a cluster: ``SCAN``
goes to every primary, every command and script names its keys, and all the
keys of one queue share a hash tag (one slot, one node; see
:mod:`celery_streams.keys`). Two things do not, and these helpers cover them:

* a transaction or a script in a pipeline: redis-py's cluster pipeline runs
  neither. :func:`node_client` gives the plain client of the node that owns a
  key (the client itself without a cluster), so a ``MULTI`` of one queue's
  keys with ``TIME``, or a pipeline of that queue's scripts, runs there as on
  a single server;
* :func:`by_node` splits work on many queues into one batch per node.

With a plain client both return what they were given: the single-server path
does not change. A key whose slot moves between the lookup and the call gets
``MOVED`` from the node: the command fails and says so, and running it again
finds the new owner.
"""
from __future__ import annotations

from typing import Callable, Iterable, TypeAlias, TypeVar

import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

T = TypeVar('T')
#: A client the operator functions take: a plain ``redis.Redis`` or redis-py's ``RedisCluster``.
Client: TypeAlias = redis.Redis | RedisCluster

#: Commands whose key is their third argument (after a subcommand).
_SUBCOMMANDS = frozenset((b'XGROUP', b'XINFO', b'OBJECT', b'MEMORY'))
#: Commands without a key.
_KEYLESS = frozenset((b'TIME', b'PING', b'WAIT', b'SCRIPT', b'INFO', b'CONFIG', b'CLIENT'))


def slot_of(key: str | bytes) -> int:
    """The cluster slot of ``key`` (its hash tag's, when it has one)."""
    return key_slot(key if isinstance(key, bytes) else key.encode())


def is_cluster(client) -> bool:
    """Whether ``client`` is a redis-py cluster client."""
    return isinstance(client, RedisCluster)


def node_client(client, key: str) -> redis.Redis:
    """The plain client of the node that owns ``key`` now (``client`` itself without a cluster)."""
    if not is_cluster(client):
        return client
    return client.get_redis_connection(client.get_node_from_key(key))


def by_node(client, items: Iterable[T], key: Callable[[T], str]) -> list[tuple[redis.Redis, list[T]]]:
    """``items`` grouped by the node that owns ``key(item)``: ``[(node client, items)]``, in
    the order of each node's first item. Without a cluster: ``[(client, items)]``."""
    items = list(items)
    if not is_cluster(client):
        return [(client, items)] if items else []
    groups: dict[str, tuple[redis.Redis, list[T]]] = {}
    for item in items:
        node = client.get_node_from_key(key(item))
        groups.setdefault(node.name, (client.get_redis_connection(node), []))[1].append(item)
    return list(groups.values())


def by_slot(items: Iterable[T], key: Callable[[T], str]) -> list[list[T]]:
    """``items`` grouped by the slot of ``key(item)``, in the order of each slot's first item."""
    groups: dict[int, list[T]] = {}
    for item in items:
        groups.setdefault(slot_of(key(item)), []).append(item)
    return list(groups.values())


def command_slot(args) -> int | None:
    """The slot of the keys of command ``args`` (its first key's), or None for a keyless one."""
    name = _word(args[0])
    if name in _KEYLESS:
        return None
    if name in (b'EVALSHA', b'EVAL'):
        key = args[3] if int(args[2]) else None
    elif name in _SUBCOMMANDS:
        key = args[2]
    elif name == b'XREADGROUP':
        key = args[[_word(arg) for arg in args].index(b'STREAMS') + 1]
    else:
        key = args[1]
    if key is None:
        return None
    return slot_of(key if isinstance(key, bytes) else str(key))


def _word(arg) -> bytes:
    return (arg if isinstance(arg, bytes) else str(arg).encode()).upper()
