"""Redis Cluster adapters for the operator commands: where a key lives, one node at a time.

The operator functions (:mod:`celery_streams.admin`,
:mod:`celery_streams.deadletters`) take a plain ``redis.Redis`` or a
redis-py ``RedisCluster`` alike. Most of what they send works unchanged on a
cluster: ``SCAN`` goes to every primary, every command and script names its
keys, and all the keys of one queue share a hash tag (one slot, one node; see
:mod:`celery_streams.keys`). Two things do not, and these adapters cover them:

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

from typing import Callable, Iterable, TypeVar

import redis
from redis.cluster import RedisCluster

T = TypeVar('T')


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
