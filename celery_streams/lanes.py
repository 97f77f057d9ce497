"""The reader's connections: a lane is one connection and the read outstanding on it.

A blocked connection serves nothing else, so reads go out on connections of
their own. :class:`ServerLanes` is one server's (or the master Sentinels
name): one lane for all the queues of a channel, which follows the master
when the Sentinels move it. :class:`ClusterLanes` is a Redis Cluster's: Redis
refuses a read whose keys lie in two slots, even on one node, so each slot
read (all of one queue's keys share a slot) gets a lane of its own on the
master that owns it, and the reads of all of them are out at once.
:mod:`celery_streams.topology` picks one; :class:`celery_streams.reader.Reader`
sends the reads and parses their replies, whatever the lanes.
"""
from __future__ import annotations

import logging
from time import monotonic
from typing import Callable, NamedTuple

import redis
from redis.exceptions import AskError, MovedError

from . import errors, wire
from .slots import slot_of

logger = logging.getLogger(__name__)


class Carried(NamedTuple):
    """Commands a read carries: written just before it, in the same write (the acks of the
    tasks that finished, the ledger's counts), so that Redis takes both in one socket read.

    ``on_replies(replies)`` gets their replies (an error reply as its exception) when the
    read's reply is taken; ``on_lost()`` is called instead when the connection broke before
    they could be read: whether they ran is unknown, and the caller writes them again (an
    ack again does nothing).
    """

    packed: bytes
    replies: int
    on_replies: Callable
    on_lost: Callable


class Read(NamedTuple):
    """A read sent on a channel's reader connection, its reply not yet parsed."""

    connection: redis.Connection
    command: str
    queues: list
    noack: bool
    sent_at: float
    max_messages: int = 0    # the most it may bring (not `count`: that is tuple.count)
    carried: Carried | None = None


class Lane:
    """One reading connection and the read outstanding on it (at most one)."""

    def __init__(self, client: redis.Redis, asking: bool = False):
        self.client = client
        self.outstanding: Read | None = None
        #: The last read found nothing: the next one waits for new entries (``BLOCK``).
        self.block_next = False
        #: The stream the last read took its whole budget from (a backlog), or None: the next
        #: read of it may be a plain ``XREADGROUP`` (:meth:`celery_streams.reader.Reader.start`).
        self.backlog: str | None = None
        #: Redis Cluster: the slot is migrating here; each read goes after ``ASKING``.
        self.asking = asking
        #: When a read last went out on this lane (monotonic; 0: never): the lanes that waited
        #: longest read first when the prefetch budget cannot cover them all.
        self.last_sent = 0.0

    @property
    def connection(self) -> redis.Connection | None:
        """The lane's one connection; None once the lane is closed."""
        return self.client.connection

    def fileno(self) -> int | None:
        sock = self.outstanding.connection._sock if self.outstanding is not None else None
        return None if sock is None else sock.fileno()

    def send(self, kind: str, command: bytes, queues, noack, count,
             carried: Carried | None = None) -> int | None:
        """Send a read, after the commands it ``carried``; returns the file descriptor its
        reply arrives on."""
        connection = self.client.connection
        if connection is None:   # closed (:meth:`close`): its client holds no connection any more
            if carried is not None:
                carried.on_lost()
            raise redis.ConnectionError('celery_streams: read on a closed lane')
        if carried is not None:
            command = carried.packed + command
        if self.asking:
            command = wire.pack(['ASKING']) + command
        try:
            if connection._sock is None:
                connection.connect()
            connection.send_packed_command([command])
        except errors.connection_errors:
            connection.disconnect()
            if carried is not None:
                carried.on_lost()
            raise
        self.outstanding = Read(connection, kind, queues, noack, monotonic(), count, carried)
        self.last_sent = self.outstanding.sent_at
        return self.fileno()

    def receive(self):
        """The reply of the outstanding read (its error raised); the read is no longer out.
        The replies of the commands it carried go to their ``on_replies`` (once read, whatever
        the read's own reply)."""
        read, self.outstanding = self.outstanding, None
        carried, answered = read.carried, None
        try:
            if self.asking:
                self.client.parse_response(read.connection, 'ASKING')
            if carried is not None:
                answered = [_reply(read.connection) for _ in range(carried.replies)]
            if read.command == 'EVALSHA':
                [replies] = self.client.parse_response(read.connection, 'EVALSHA')
                return replies
            return self.client.parse_response(read.connection, 'XREADGROUP')
        except redis.ResponseError:
            raise
        except BaseException:
            read.connection.disconnect()
            if carried is not None and answered is None:
                carried.on_lost()
            raise
        finally:
            if answered is not None and carried is not None:
                carried.on_replies(answered)

    def drop(self) -> None:
        if self.client.connection is not None:
            self.client.connection.disconnect()
        self._lose()

    def close(self) -> None:
        self._lose()
        self.client.close()
        self.client.connection_pool.disconnect()

    def _lose(self) -> None:
        """The outstanding read is given up: the commands it carried are written again."""
        read, self.outstanding = self.outstanding, None
        if read is not None and read.carried is not None:
            read.carried.on_lost()


def _reply(connection):
    """One reply off ``connection``; an error reply as its exception, not raised."""
    try:
        return connection.read_response()
    except redis.ResponseError as exc:
        return exc


class ServerLanes:
    """A channel's one lane on one server (or the master Sentinels name).

    ``open_pool()`` makes the pool of one connection the lane reads on;
    ``moves()`` counts the times the Sentinels moved the master: when it
    changed, the lane drops its connection and reads from the new master.
    """

    #: Whether a read may carry the channel's queued acks in its write (:class:`Carried`):
    #: here they go to the server the pipe writes to, and Redis takes both in one socket read.
    carry_acks = True

    def __init__(self, open_pool: Callable[[], redis.ConnectionPool], moves: Callable[[], int]):
        self._open_pool = open_pool
        self._moves = moves
        self._seen_moves = moves()
        self._lane: Lane | None = None

    def lane(self) -> Lane:
        """The one lane (made at first use)."""
        if self._lane is None:
            client = redis.Redis(connection_pool=self._open_pool(), single_connection_client=True)
            self._lane = Lane(client)
        return self._lane

    def client(self, queues) -> redis.Redis:
        """The client of the lane (Celery's cold shutdown closes its connection)."""
        return self.lane().client

    def lanes(self) -> list:
        """Every lane open now."""
        return [self._lane] if self._lane is not None else []

    def route(self, queues) -> list:
        """``[(lane, its queues)]``: where each of ``queues`` is read."""
        return [(self.lane(), queues)]

    def follow_master(self) -> None:
        """Before reads: the Sentinels moved the master, so the lane reads from the new one."""
        moves = self._moves()
        if moves != self._seen_moves:
            self._seen_moves = moves
            logger.info('celery_streams: the master moved (Sentinel): reading from the new one')
            for lane in self.lanes():
                lane.drop()

    def redirected(self, lane, read, error) -> bool:
        """One server never sends a read elsewhere."""
        return False

    def finished(self, lane) -> None:
        """A reply was read on ``lane``: nothing to do on one server."""

    def close(self) -> None:
        for lane in self.lanes():
            lane.close()


class ClusterLanes:
    """A channel's lanes on a Redis Cluster: one per slot read, on the master that owns it.

    When a slot moves, the node answers the next read ``MOVED`` (the lane goes
    to the new owner) or, while it migrates, ``ASK`` (one read goes to the
    target, after ``ASKING``; the next asks the owner again). A node that goes
    away breaks its lane's connection: the channel's connection is lost, and
    kombu's reconnect finds the masters anew.
    """

    #: A lane reads one slot, and may be redirected: acks go on the cluster pipe.
    carry_acks = False

    def __init__(self, cluster, open_pool: Callable[[str, int], redis.ConnectionPool],
                 stream_of: Callable[[str], str]):
        self.cluster = cluster            # redis-py's RedisCluster: who owns a slot
        self._open_pool = open_pool       # (host, port) -> a pool of one connection
        self._stream_of = stream_of       # queue -> its main stream key (its slot)
        self._lanes: dict[int, Lane] = {}   # slot -> its lane
        self._turn = 0
        self._moving: dict[int, tuple] = {}   # slot -> where it migrates (ASK), logged

    def client(self, queues) -> redis.Redis:
        """The client of the first lane (Celery's cold shutdown closes its connection), or of
        a lane to the owner of the first of ``queues``."""
        lanes = self.lanes()
        if lanes:
            return lanes[0].client
        return self._lane_for(slot_of(self._stream_of((list(queues) or ['celery'])[0]))).client

    def lanes(self) -> list:
        return list(self._lanes.values())

    def route(self, queues) -> list:
        """``[(lane, queues)]``: the queues by slot, each slot's lane; lanes no queue needs
        any more are closed. The order turns, so that no slot always reads first."""
        by_slot: dict[int, list] = {}
        for queue in queues:
            by_slot.setdefault(slot_of(self._stream_of(queue)), []).append(queue)
        for slot in [slot for slot, lane in self._lanes.items()
                     if slot not in by_slot and lane.outstanding is None]:
            self._lanes.pop(slot).close()
        routes = [(self._lane_for(slot), slot_queues) for slot, slot_queues in by_slot.items()]
        if len(routes) > 1:
            self._turn = (self._turn + 1) % len(routes)
            routes = routes[self._turn:] + routes[:self._turn]
        return routes

    def follow_master(self) -> None:
        """Masters are followed read by read (``MOVED``), not before."""

    def _lane_for(self, slot: int) -> Lane:
        lane = self._lanes.get(slot)
        if lane is None:
            node = self.cluster.nodes_manager.get_node_from_slot(slot)
            lane = self._lanes[slot] = self._open(node.host, node.port)
        return lane

    def _open(self, host, port, asking: bool = False) -> Lane:
        return Lane(redis.Redis(connection_pool=self._open_pool(host, port),
                                single_connection_client=True), asking)

    def finished(self, lane) -> None:
        """``ASK`` holds for one read: the next goes to the owner again, which answers ``ASK``
        while the slot migrates and ``MOVED`` once it is done."""
        if lane.asking and lane.outstanding is None:
            self._forget(lane)

    def _slot_of(self, lane) -> int | None:
        return next((slot for slot, known in self._lanes.items() if known is lane), None)

    def _forget(self, lane) -> None:
        slot = self._slot_of(lane)
        if slot is not None:
            self._lanes.pop(slot).close()

    def redirected(self, lane, read, error) -> bool:
        """The read was sent elsewhere (``MOVED``, ``ASK``): the lane follows; True if so."""
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

    def close(self) -> None:
        for lane in self.lanes():
            lane.close()
