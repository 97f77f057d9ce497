"""A channel's commands on a Redis Cluster: one batch per master, redirections followed.

:class:`ClusterDispatcher` stands where a single server's
:class:`~celery_streams.wire.Dispatcher` does, :class:`ClusterPipe` where a
:class:`~celery_streams.pipe.Pipe` does; :mod:`celery_streams.topology` picks
them. The reader's connections on a cluster (a lane per slot) are in
:mod:`celery_streams.lanes`; where a key lives, in :mod:`celery_streams.slots`.
"""
from __future__ import annotations

import redis
from redis.cluster import RedisCluster
from redis.exceptions import (AskError, ClusterDownError, RedisClusterException,
                              SlotNotCoveredError, TryAgainError)

from . import wire
from .slots import command_slot


class ClusterDispatcher:
    """:class:`~celery_streams.wire.Dispatcher` on a Redis Cluster: a channel's commands
    sent in one batch, each to the master that owns its key.

    The commands are packed by hand and written on one connection per node
    (a :class:`~celery_streams.wire.Dispatcher`), all nodes before any reply is
    read; redis-py's cluster pipeline cost twice the client time per publish.
    Every command the transport batches names the keys of one queue (one
    slot). A command answered ``MOVED`` or ``ASK`` (its slot moved, or is
    moving), ``TRYAGAIN`` or ``CLUSTERDOWN`` is sent again through redis-py's
    cluster pipeline, which follows the redirection and reads the topology
    anew. A broken connection reads the topology anew too (a failover), and
    is raised: the caller's retry goes to the new master.
    """

    #: Replies that mean "not here, not now": sent again through redis-py.
    REDIRECTS = (AskError, TryAgainError, ClusterDownError)

    def __init__(self, client: RedisCluster):
        self.client = client
        self._dispatchers: dict = {}   # node name -> its Dispatcher

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
                line = self._dispatcher(node)   # each holds a lock: taken in one order, never crossed
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

    def _dispatcher(self, node) -> wire.Dispatcher:
        line = self._dispatchers.get(node.name)
        if line is None:
            line = self._dispatchers[node.name] = wire.Dispatcher(
                self.client.get_redis_connection(node).connection_pool)
        return line

    def _refresh(self) -> None:
        """Read the topology anew (a master may have failed over); quietly, if none answers."""
        try:
            self.client.nodes_manager.initialize()
        except (redis.RedisError, RedisClusterException):
            pass

    def disconnect(self) -> None:
        for line in self._dispatchers.values():
            line.disconnect()
        self._dispatchers.clear()
        self.client.close()


class ClusterPipe:
    """:class:`~celery_streams.pipe.Pipe`'s interface on a Redis Cluster: each write waits for
    its replies (a batch per node through :class:`ClusterDispatcher`), so nothing is left unread."""

    unconfirmed = 0

    def __init__(self, dispatcher: ClusterDispatcher):
        self.dispatcher = dispatcher

    def write(self, commands, wait: bool = False, on_replies=None, retry: bool = True) -> None:
        replies = self.dispatcher.calls(list(commands))
        if on_replies is not None:
            on_replies(replies)
            return
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply

    def collect(self, wait: bool = False, timeout: float | None = None) -> None:
        """Nothing is ever unread."""
