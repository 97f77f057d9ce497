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

import logging
from typing import Callable, Iterable, TypeVar

import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import (AskError, ClusterDownError, MovedError, RedisClusterException,
                              SlotNotCoveredError, TryAgainError)

from . import wire
from .reader import Lane, Reader

logger = logging.getLogger(__name__)

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


def by_slot(items: Iterable[T], key: Callable[[T], str]) -> list[list[T]]:
    """``items`` grouped by the slot of ``key(item)``, in the order of each slot's first item."""
    groups: dict[int, list[T]] = {}
    for item in items:
        groups.setdefault(key_slot(key(item).encode()), []).append(item)
    return list(groups.values())


# -- workers and publishers ---------------------------------------------------


class ClusterLine:
    """Where a single server's pool (or :class:`~celery_streams.wire.Line`) stands for a
    channel on a Redis Cluster: commands sent in one batch, each to the master that owns
    its key.

    The commands are packed by hand and written on one connection per node
    (a :class:`~celery_streams.wire.Line`), all nodes before any reply is
    read; redis-py's cluster pipeline cost twice the client time per publish.
    Every command the transport batches names the keys of one queue (one
    slot). A command answered ``MOVED`` or ``ASK`` (its slot moved, or is
    moving), ``TRYAGAIN`` or ``CLUSTERDOWN`` is sent again through redis-py's
    cluster pipeline, which follows the redirection and reads the topology
    anew. A broken connection reads the topology anew too (a failover), and
    is raised: the caller's retry goes to the new master.
    """

    #: What :func:`celery_streams.connection.moves` reads (Sentinel only).
    moves = 0
    #: Replies that mean "not here, not now": sent again through redis-py.
    REDIRECTS = (AskError, TryAgainError, ClusterDownError)

    def __init__(self, client: RedisCluster):
        self.client = client
        self._lines: dict = {}   # node name -> Line

    def calls(self, commands) -> list:
        """The replies of ``commands`` (errors as exceptions), in order."""
        nodes: dict = {}
        manager = self.client.nodes_manager
        for i, args in enumerate(commands):
            slot = command_slot(args)
            if slot is None:   # no key (TIME, PING): any master
                node = self.client.get_default_node()
            else:
                try:
                    node = manager.get_node_from_slot(slot)
                except SlotNotCoveredError:
                    return self._through_redis_py(commands)
            nodes.setdefault(node.name, (node, []))[1].append(i)
        replies: list = [None] * len(commands)
        sent = []
        try:
            for node, indexes in sorted(nodes.values(), key=lambda pair: pair[0].name):
                line = self._line(node)   # each holds a lock: taken in one order, never crossed
                connection = line.get_connection()
                sent.append((line, connection, indexes))
                connection.send_packed_command([b''.join(wire.pack(commands[i]) for i in indexes)])
            for _, connection, indexes in sent:
                for i in indexes:
                    try:
                        replies[i] = connection.read_response()
                    except redis.ResponseError as error:
                        replies[i] = error
        except BaseException:
            for _, connection, _ in sent:
                connection.disconnect()   # half read: never used again
            self._refresh()
            raise
        finally:
            for line, connection, _ in sent:
                line.release(connection)
        again = [i for i, reply in enumerate(replies) if isinstance(reply, self.REDIRECTS)]
        if again:
            for i, reply in zip(again, self._through_redis_py([commands[i] for i in again])):
                replies[i] = reply
        return replies

    def _through_redis_py(self, commands) -> list:
        with self.client.pipeline(transaction=False) as pipe:
            for args in commands:
                pipe.execute_command(*args)
            return pipe.execute(raise_on_error=False)

    def _line(self, node) -> wire.Line:
        line = self._lines.get(node.name)
        if line is None:
            line = self._lines[node.name] = wire.Line(self.client.get_redis_connection(node).connection_pool)
        return line

    def _refresh(self) -> None:
        """Read the topology anew (a master may have failed over); quietly, if none answers."""
        try:
            self.client.nodes_manager.initialize()
        except (redis.RedisError, RedisClusterException):
            pass

    def disconnect(self) -> None:
        for line in self._lines.values():
            if line._connection is not None:
                line._connection.disconnect()
        self._lines.clear()
        self.client.close()


#: Commands whose key is their third argument (after a subcommand).
_SUBCOMMANDS = frozenset((b'XGROUP', b'XINFO', b'OBJECT', b'MEMORY'))
#: Commands without a key.
_KEYLESS = frozenset((b'TIME', b'PING', b'WAIT', b'SCRIPT', b'INFO', b'CONFIG', b'CLIENT'))


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
    return key_slot(key if isinstance(key, bytes) else str(key).encode())


def _word(arg) -> bytes:
    return (arg if isinstance(arg, bytes) else str(arg).encode()).upper()


class ClusterPipe:
    """:class:`~celery_streams.pipe.Pipe`'s interface on a Redis Cluster: each write waits for
    its replies (a batch per node through :class:`ClusterLine`), so nothing is left unread."""

    unconfirmed = 0

    def __init__(self, line: ClusterLine):
        self.line = line

    def write(self, commands, wait: bool = False, on_replies=None, retry: bool = True) -> None:
        replies = self.line.calls(list(commands))
        if on_replies is not None:
            on_replies(replies)
            return
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply

    def collect(self, wait: bool = False, timeout: float | None = None) -> None:
        """Nothing is ever unread."""


class ClusterReader(Reader):
    """A channel's reads on a Redis Cluster: a lane per slot read, on the node that owns it.

    Redis refuses a read whose keys lie in two slots, even on one node, and a
    blocked connection serves nothing else: each slot with a consumed queue
    (all of one queue's keys share a slot) gets a connection of its own to
    its master, and the reads of all of them are out at once. When a slot
    moves, the node answers the next read ``MOVED`` (the lane goes to the new
    owner) or, while it migrates, ``ASK`` (one read goes to the target, after
    ``ASKING``; the next asks the owner again). A node that goes away breaks its lane's
    connection: the channel's connection is lost, and kombu's reconnect finds
    the masters anew.
    """

    def __init__(self, channel):
        super().__init__(channel)
        self.cluster: RedisCluster = channel.pool_client
        self._lanes: dict[int, Lane] = {}   # slot -> its lane
        self._turn = 0
        self._moving: dict[int, tuple] = {}   # slot -> where it migrates (ASK), logged

    @property
    def client(self) -> redis.Redis:
        """The connection of the first lane (Celery's cold shutdown closes it), or a lane's
        to the owner of the first consumed queue."""
        lanes = self.lanes()
        if lanes:
            return lanes[0].client
        queues = self.channel.consuming_queues() or ['celery']
        return self._lane_for(key_slot(self.keys.stream(queues[0]).encode())).client

    def lanes(self) -> list:
        return list(self._lanes.values())

    def route(self, queues) -> list:
        """``[(lane, queues)]``: the queues by slot, each slot's lane; lanes no queue needs
        any more are closed. The order turns, so that no slot always reads first."""
        by_slot: dict[int, list] = {}
        for queue in queues:
            by_slot.setdefault(key_slot(self.keys.stream(queue).encode()), []).append(queue)
        for slot in [slot for slot, lane in self._lanes.items()
                     if slot not in by_slot and lane.outstanding is None]:
            self._lanes.pop(slot).close()
        routes = [(self._lane_for(slot), slot_queues) for slot, slot_queues in by_slot.items()]
        if len(routes) > 1:
            self._turn = (self._turn + 1) % len(routes)
            routes = routes[self._turn:] + routes[:self._turn]
        return routes

    def _lane_for(self, slot: int) -> Lane:
        lane = self._lanes.get(slot)
        if lane is None:
            node = self.cluster.nodes_manager.get_node_from_slot(slot)
            lane = self._lanes[slot] = self._open(node.host, node.port)
        return lane

    def _open(self, host, port, asking: bool = False) -> Lane:
        pool = self.channel.address.node_pool(self.options, host, port)
        return Lane(redis.Redis(connection_pool=pool, single_connection_client=True), asking)

    def _finish(self, lane) -> bool:
        try:
            return super()._finish(lane)
        finally:
            if lane.asking and lane.outstanding is None:
                # ASK holds for one read: the next goes to the owner again, which
                # answers ASK while the slot migrates and MOVED once it is done.
                self._forget(lane)

    def _slot_of(self, lane) -> int | None:
        return next((slot for slot, known in self._lanes.items() if known is lane), None)

    def _forget(self, lane) -> None:
        slot = self._slot_of(lane)
        if slot is not None:
            self._lanes.pop(slot).close()

    def redirected(self, lane, read, error) -> bool:
        if not isinstance(error, (AskError, MovedError)):   # MovedError is an AskError
            return False
        slot = self._slot_of(lane)
        if slot is None:
            return True
        asking = not isinstance(error, MovedError)
        if not asking:
            # The topology changed: every command of the channel needs the new one.
            self.cluster.nodes_manager.initialize()
        if not asking or self._moving.get(slot) != (error.host, error.port):
            logger.info('celery_streams: slot %d of queue(s) %s %s %s:%s; reading there',
                        slot, ', '.join(map(repr, read.queues)),
                        'is moving to' if asking else 'moved to', error.host, error.port)
        if asking:
            self._moving[slot] = (error.host, error.port)   # logged once per migration
        else:
            self._moving.pop(slot, None)
        lane.close()
        self._lanes[slot] = self._open(error.host, error.port, asking=asking)
        return True
