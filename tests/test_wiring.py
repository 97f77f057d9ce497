"""Server-free tests of the wiring: the pipe, slots, read plans, fanout patterns and lanes.

Nothing here starts or reaches a Redis server. Where a collaborator talks to
Redis it is faked, and each fake does only what the code under test uses (a
connection's ``_sock`` identity, ``send_packed_command(check_health=False)``,
``can_read``, ``read_response``...). How a real server behaves is the subject
of the real-server tests.
"""
from __future__ import annotations

import os
from collections import Counter, deque
from types import SimpleNamespace

import pytest
import redis
from redis.crc import key_slot
from redis.exceptions import ResponseError

from celery_streams import lanes, pipe as pipe_module, slots, wire
from celery_streams.keys import Keys
from celery_streams.options import Options
from celery_streams.pipe import Pipe
from celery_streams.reader import Reader
from celery_streams.publisher import fanout_matches


def parse(data: bytes) -> list[list[bytes]]:
    """The commands in ``data`` (RESP arrays of bulk strings without CR/LF in them)."""
    parts, commands, i = data.split(b'\r\n'), [], 0
    while i < len(parts) and parts[i]:
        assert parts[i].startswith(b'*'), parts[i]
        n = int(parts[i][1:])
        commands.append([parts[i + 2 + 2 * j] for j in range(n)])
        i += 1 + 2 * n
    return commands


def echo(*names) -> list[tuple]:
    """``ECHO`` commands: the fake server answers each with its argument."""
    return [('ECHO', name) for name in names]


# -- 1. Pipe -------------------------------------------------------------------------------

class FakeConnection:
    """A redis-py connection as :class:`~celery_streams.pipe.Pipe` uses it.

    The fake server answers ``ECHO x`` with ``b'x'`` and ``FAIL`` with an error
    reply. Replies are queued when a command is sent; ``arrived`` of them are in
    the socket already (``can_read`` sees only those), the rest come when a read
    blocks for them. ``auto``: every reply arrives at once.
    """

    def __init__(self, auto=True):
        self.auto = auto
        self.sent: list[list[list[bytes]]] = []   # per send: its commands
        self.fail_send = False
        self.drop_every_time = False   # every socket breaks at its first read
        self.connects = self.disconnects = 0
        self.connect()

    def connect(self):
        self.connects += 1
        self._sock = object()
        self.pending: deque = deque()   # replies on their way (this socket's)
        self.arrived = 0
        # Reads that succeed before the connection breaks (None: it never breaks).
        self.reads_before_drop = 0 if self.drop_every_time else None

    def disconnect(self):
        self.disconnects += 1
        self._sock = None
        self.pending.clear()
        self.arrived = 0

    def send_packed_command(self, parts, check_health=True):
        assert check_health is False, "a health check's PING would read earlier writes' replies"
        if self._sock is None:
            self.connect()
        if self.fail_send:
            raise redis.ConnectionError('send failed')
        commands = parse(b''.join(parts))
        self.sent.append(commands)
        for command in commands:
            name = command[0].upper()
            self.pending.append(ResponseError('ERR failed') if name == b'FAIL' else command[1])
        if self.auto:
            self.arrive()

    def arrive(self, n=None):
        self.arrived = len(self.pending) if n is None else min(len(self.pending), self.arrived + n)

    def can_read(self, timeout=0):
        return self.arrived > 0

    def read_response(self):
        if self.reads_before_drop is not None:
            if self.reads_before_drop == 0:
                raise redis.ConnectionError('connection reset by peer')
            self.reads_before_drop -= 1
        assert self.pending, 'read_response would block forever: no reply is coming'
        reply = self.pending.popleft()
        self.arrived = max(0, self.arrived - 1)
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    def names_sent(self) -> list[list[bytes]]:
        """Per send, the arguments of its ECHO/FAIL commands."""
        return [[command[1] for command in commands] for commands in self.sent]


class FakePool:
    """Hands out a new :class:`FakeConnection` each time (a forked child takes its own)."""

    def __init__(self, auto=True):
        self.auto = auto
        self.connections: list[FakeConnection] = []

    def get_connection(self):
        connection = FakeConnection(self.auto)
        self.connections.append(connection)
        return connection

    def release(self, connection):
        pass

    @property
    def connection(self) -> FakeConnection:
        [connection] = self.connections
        return connection


def test_pipe_writes_without_reading_and_delivers_replies_later_in_write_order():
    pool = FakePool(auto=False)
    pipe, got = Pipe(pool), []
    pipe.write(echo('a'), on_replies=got.append)
    pipe.write(echo('b', 'c'), on_replies=got.append)
    assert pool.connection.names_sent() == [[b'a'], [b'b', b'c']]   # written at once
    assert got == [] and pipe.unconfirmed == 2

    pool.connection.arrive(1)   # only a's reply is in: a write reads it, and no more
    pipe.write(echo('d'), on_replies=got.append)
    assert got == [[b'a']] and pipe.unconfirmed == 2

    pool.connection.arrive()
    pipe.collect()
    assert got == [[b'a'], [b'b', b'c'], [b'd']]
    assert pipe.unconfirmed == 0


def test_pipe_writes_again_the_commands_a_broken_read_left_unanswered():
    pool = FakePool(auto=False)
    pipe, got = Pipe(pool), []
    for name in ('a', 'b', 'c'):
        pipe.write(echo(name), on_replies=got.append)
    connection = pool.connection
    connection.arrive()
    connection.reads_before_drop = 1   # a's reply is read, then the connection breaks
    pipe.collect(wait=True)   # a wait for every reply writes b and c again on a new socket
    assert connection.names_sent()[-1] == [b'b', b'c']   # a was answered: not written again
    assert Counter(name for send in connection.names_sent() for name in send) == {
        b'a': 1, b'b': 2, b'c': 2}
    assert got == [[b'a'], [b'b'], [b'c']]   # a's reply delivered once, before the others
    assert pipe.unconfirmed == 0


def test_a_wait_gives_up_after_resends_that_get_no_reply():
    pool = FakePool(auto=False)
    pipe, got = Pipe(pool), []
    pipe.write(echo('a'), on_replies=got.append)
    pool.connection.drop_every_time = True   # every read breaks, on every new socket
    pool.connection.reads_before_drop = 0
    with pytest.raises(redis.ConnectionError):
        pipe.collect(wait=True)
    assert got == [] and pipe.unconfirmed == 1   # kept for the next call
    # RESENDS tries without a reply: the first on the socket it was written on, each
    # other one on a new socket, written again.
    assert pool.connection.names_sent() == [[b'a']] * pipe_module.RESENDS


def _reconnected(pool):
    """Another socket under the pipe: closed and opened again (replies in flight lost)."""
    pool.connection.disconnect()
    pool.connection.connect()


def _master_moved(pool):
    """The Sentinels moved the master: the dispatcher reconnects (to the new one)."""
    pool.moves = 1


@pytest.mark.parametrize('change', [_reconnected, _master_moved])
def test_pipe_writes_unanswered_commands_again_on_a_new_socket(change):
    pool = FakePool(auto=False)
    pipe, got = Pipe(pool), []
    pipe.write(echo('a'), on_replies=got.append)
    pool.connection.arrive()
    pipe.write(echo('b'), on_replies=got.append)   # reads a's reply (it arrived)
    pipe.write(echo('c'), on_replies=got.append)
    assert got == [[b'a']]
    old_socket = pool.connection._sock

    change(pool)
    pipe.write(echo('d'), on_replies=got.append)
    assert pool.connection._sock is not old_socket
    # b and c lost their replies with the old socket: written again, before d, in one write.
    assert pool.connection.names_sent()[-1] == [b'b', b'c', b'd']
    pipe.collect(wait=True)
    assert got == [[b'a'], [b'b'], [b'c'], [b'd']]


def test_a_write_without_retry_that_could_not_be_sent_is_dropped_and_raised():
    pool = FakePool(auto=False)
    pipe, got = Pipe(pool), []
    pipe.write(echo('a'), on_replies=got.append)
    pool.connection.fail_send = True
    with pytest.raises(redis.ConnectionError):
        pipe.write(echo('b'), on_replies=got.append, retry=False)
    assert pool.connection._sock is None
    assert pipe.unconfirmed == 1   # a stays the pipe's: b is its caller's to retry

    pool.connection.fail_send = False
    pipe.collect(wait=True)
    assert pool.connection.names_sent()[-1] == [b'a']
    assert got == [[b'a']]


def test_a_write_with_retry_that_could_not_be_sent_is_written_by_the_next_call():
    pool = FakePool(auto=False)
    pipe, got = Pipe(pool), []
    pipe.write(echo('a'), on_replies=got.append)
    pool.connection.fail_send = True
    with pytest.raises(redis.ConnectionError):
        pipe.write(echo('b'), on_replies=got.append)
    assert pipe.unconfirmed == 2

    pool.connection.fail_send = False
    pipe.collect(wait=True)
    assert pool.connection.names_sent()[-1] == [b'a', b'b']
    assert got == [[b'a'], [b'b']]


@pytest.mark.parametrize('retry', [False, True])
def test_a_write_whose_read_finds_the_socket_closed_writes_again_at_once(retry):
    pool = FakePool(auto=True)
    pipe, got = Pipe(pool), []
    pipe.write(echo('before'), on_replies=got.append)
    pool.connection.reads_before_drop = 0   # the next write goes out; reading its reply breaks
    pipe.write(echo('a'), on_replies=got.append, retry=retry)   # the server closed it: again
    assert pool.connection.names_sent() == [[b'before'], [b'a'], [b'a']]
    assert got == [[b'before'], [b'a']] and pipe.unconfirmed == 0


def test_a_write_with_wait_returns_once_every_reply_was_read():
    pool = FakePool(auto=False)   # no reply arrives unless a read waits for it
    pipe, got = Pipe(pool), []
    pipe.write(echo('a'), on_replies=got.append)
    pipe.write(echo('b'), on_replies=got.append)
    pipe.write(echo('c'), on_replies=got.append, wait=True)
    assert got == [[b'a'], [b'b'], [b'c']]
    assert pipe.unconfirmed == 0 and not pool.connection.pending


def test_collect_with_a_timeout_gives_up_on_a_server_that_does_not_answer():
    pool = FakePool(auto=False)
    pipe, got = Pipe(pool), []
    pipe.write(echo('a'), on_replies=got.append)
    pipe.collect(wait=True, timeout=0.01)   # can_read(timeout) says nothing came: no blocking read
    assert got == [] and pipe.unconfirmed == 1


def test_past_max_unread_a_write_without_poll_reads_the_older_half():
    pool = FakePool(auto=True)
    pipe, got = Pipe(pool, max_unread=4, poll=False), []
    for name in 'abcd':
        pipe.write(echo(name), on_replies=got.append)
    assert got == [] and pipe.unconfirmed == 4   # replies arrived, but nobody polls
    pipe.write(echo('e'), on_replies=got.append)
    assert got == [[b'a'], [b'b'], [b'c']] and pipe.unconfirmed == 2


def test_past_max_unread_a_polling_write_waits_for_every_reply():
    pool = FakePool(auto=False)
    pipe, got = Pipe(pool, max_unread=2), []
    for name in 'abc':
        pipe.write(echo(name), on_replies=got.append)
    assert got == [[b'a'], [b'b'], [b'c']] and pipe.unconfirmed == 0


def test_a_forked_child_forgets_the_parents_unread_writes(monkeypatch):
    pool = FakePool(auto=False)
    pipe, got = Pipe(pool), []
    pipe.write(echo('parent'), on_replies=got.append)
    parent_connection = pool.connection

    child_pid = pipe._pid + 1
    monkeypatch.setattr(os, 'getpid', lambda: child_pid)   # now in the child
    pipe.write(echo('child'), on_replies=got.append)
    assert pipe.unconfirmed == 1
    pipe.collect(wait=True)

    assert len(pool.connections) == 2   # the child writes on a connection of its own
    child_connection = pool.connections[1]
    assert child_connection.names_sent() == [[b'child']]   # the parent's write is not its
    assert parent_connection.names_sent() == [[b'parent']]
    assert len(parent_connection.pending) == 1   # the parent's reply is left to the parent
    assert got == [[b'child']]


def test_an_error_reply_goes_to_its_callback_as_an_exception():
    pool = FakePool(auto=True)
    pipe, got = Pipe(pool), []
    pipe.write([('FAIL', 'x'), ('ECHO', 'y')], on_replies=got.append)
    [[error, reply]] = got
    assert isinstance(error, ResponseError) and reply == b'y'


def test_an_error_reply_is_raised_only_after_every_callback_ran():
    pool = FakePool(auto=False)
    pipe, got = Pipe(pool), []
    pipe.write([('FAIL', 'x')])                    # no callback: its error is raised
    pipe.write(echo('b'), on_replies=got.append)   # answered after it: still delivered
    pool.connection.arrive()
    with pytest.raises(ResponseError, match='ERR failed'):
        pipe.collect()
    assert got == [[b'b']] and pipe.unconfirmed == 0


def test_deliver_raises_the_first_error_once_every_callback_ran():
    called = []

    def failing(name):
        def on_replies(replies):
            called.append(name)
            raise ValueError(name)
        return on_replies

    first = pipe_module.Write(b'', 1, failing('first'))
    second = pipe_module.Write(b'', 1, failing('second'))
    quiet = pipe_module.Write(b'', 1, called.append)
    with pytest.raises(ValueError, match='first'):
        pipe_module._deliver([(first, [b'1']), (second, [b'2']), (quiet, [b'3'])])
    assert called == ['first', 'second', [b'3']]


# -- 2. slots ------------------------------------------------------------------------------

def test_slot_of_is_redis_pys_key_slot_for_str_and_bytes():
    for key in ('celery', 'q:{celery}', 'q:{celery}:p3', '{}x', 'héllo', 'a{b}{c}'):
        assert slots.slot_of(key) == key_slot(key.encode())
        assert slots.slot_of(key.encode()) == key_slot(key.encode())
    assert slots.slot_of('q:{celery}') == slots.slot_of('celery')
    assert slots.slot_of('q:{celery}') != slots.slot_of('q:celery')


def test_by_slot_groups_keys_sharing_a_hash_tag_in_first_seen_order():
    assert len({slots.slot_of(tag) for tag in ('a', 'b', 'c')}) == 3
    items = ['{b}1', '{a}1', '{b}2', '{c}1', '{a}2']
    assert slots.by_slot(items, key=lambda item: item) == [
        ['{b}1', '{b}2'], ['{a}1', '{a}2'], ['{c}1']]
    records = [('x', 'q:{a}'), ('y', 'q:{a}:p3'), ('z', 'q:{b}')]
    assert slots.by_slot(records, key=lambda r: r[1]) == [records[:2], records[2:]]
    assert slots.by_slot([], key=str) == []


@pytest.mark.parametrize('args, key', [
    (('XADD', 'q:{a}', '*', 'payload', 'x'), 'q:{a}'),
    (('xadd', 'q:{a}', '*', 'payload', 'x'), 'q:{a}'),
    ((b'XADD', b'q:{a}', b'*', b'payload', b'x'), 'q:{a}'),
    (('PEXPIRE', 'q:{b}', 1000), 'q:{b}'),
    (('EVALSHA', 'f00d', 2, 'q:{b}', 'q:{b}:p3', 'arg'), 'q:{b}'),
    (('EVALSHA', 'f00d', '1', 'q:{b}'), 'q:{b}'),
    ((b'EVALSHA', b'f00d', b'1', b'q:{b}'), 'q:{b}'),
    (('EVAL', 'return 1', 1, 'q:{c}'), 'q:{c}'),
    (('XGROUP', 'CREATE', 'q:{c}', 'celery', '0', 'MKSTREAM'), 'q:{c}'),
    (('XINFO', 'STREAM', 'q:{c}'), 'q:{c}'),
    (('XREADGROUP', 'GROUP', 'g', 'c', 'COUNT', 1, 'BLOCK', 5, 'STREAMS', 'q:{d}', 'q:{d}:p3', '>', '>'),
     'q:{d}'),
    ((b'XREADGROUP', b'GROUP', b'g', b'c', b'NOACK', b'streams', b'q:{d}', b'>'), 'q:{d}'),
])
def test_command_slot_is_the_slot_of_the_first_key(args, key):
    assert slots.command_slot(args) == key_slot(key.encode())


@pytest.mark.parametrize('args', [
    ('TIME',), ('PING',), (b'PING',), ('WAIT', 1, 100), ('wait', 1, 100),
    ('SCRIPT', 'LOAD', 'return 1'), ('EVALSHA', 'f00d', 0, 'arg'), (b'EVALSHA', b'f00d', b'0'),
])
def test_command_slot_of_a_keyless_command_is_none(args):
    assert slots.command_slot(args) is None


def test_command_slot_tells_apart_keys_of_different_slots():
    assert slots.slot_of('a') != slots.slot_of('b')
    assert (slots.command_slot(('XADD', 'q:{a}', '*', 'p', 'x'))
            != slots.command_slot(('XADD', 'q:{b}', '*', 'p', 'x')))


# -- 3. read plans -------------------------------------------------------------------------

class FakeTable:
    """What a read plan asks the queue table."""

    def __init__(self, broadcast=(), deleted=(), refused=()):
        self.version = 0
        self.broadcast, self.deleted, self.refused = set(broadcast), set(deleted), set(refused)

    def is_deleted(self, queue):
        return queue in self.deleted

    def is_broadcast(self, queue):
        return queue in self.broadcast

    def __getitem__(self, queue):
        return SimpleNamespace(no_ack=False)


class FakeScheduler:
    """Shortens every BLOCK to ``due_ms`` (a scheduled entry comes due then)."""

    def __init__(self, due_ms=250):
        self.due_ms = due_ms
        self.asked = []

    def block_ms(self, block_ms, queues):
        self.asked.append((block_ms, list(queues)))
        return min(block_ms, self.due_ms)


class NoLanes:
    carry_acks = False

    def lanes(self):
        return []


def make_reader(table=None, **transport_options) -> Reader:
    options = Options.from_transport_options(transport_options)
    return Reader(options=options, keys=Keys('t:', options.priority_steps), group='g', consumer='c1',
                  lanes=NoLanes(), queues=table if table is not None else FakeTable(), inbox=None,
                  scheduler=FakeScheduler(), scripts=SimpleNamespace(read=SimpleNamespace(sha='5ha')),
                  client=None, refill_wait=None, ensure_alive=None)


def expected_streams(reader, order, queues, broadcast=()):
    return [reader.keys.stream(q, bucket) for bucket in order for q in queues
            if not bucket or q not in broadcast]


@pytest.mark.parametrize('semantics, steps, order', [
    ('kombu', None, (0, 3, 6, 9)),
    ('rabbitmq', None, (9, 6, 3, 0)),
    ('kombu', [0, 5], (0, 5)),
    ('rabbitmq', [5, 0], (5, 0)),
])
def test_a_plan_reads_the_priority_buckets_in_reading_order(semantics, steps, order):
    options = {'priority_semantics': semantics, 'queue_order_strategy': 'sorted'}
    if steps:
        options['priority_steps'] = steps
    reader = make_reader(**options)
    assert reader.options.bucket_order == order
    plan = reader.plan(['a', 'b'])
    assert plan.queues == ['a', 'b']
    assert plan.streams == expected_streams(reader, order, ['a', 'b'])
    assert plan.optional == ''.join(('1' if bucket else '0') * 2 for bucket in order)
    assert plan.packed == wire.pack_args(plan.streams)


def test_round_robin_rotates_the_queues_one_step_per_plan_in_every_bucket():
    reader = make_reader()
    orders = []
    for _ in range(4):
        plan = reader.plan(['a', 'b', 'c'])
        assert plan.packed == wire.pack_args(plan.streams)
        assert sorted(plan.queues) == ['a', 'b', 'c']
        orders.append(plan.streams)
    rotations = [['a', 'b', 'c'], ['b', 'c', 'a'], ['c', 'a', 'b'], ['a', 'b', 'c']]
    assert orders == [expected_streams(reader, (0, 3, 6, 9), queues) for queues in rotations]


def test_one_queue_is_never_rotated_and_does_not_turn_the_others():
    reader = make_reader()
    assert reader.plan(['solo']).streams == reader.keys.streams('solo')
    assert reader.plan(['a', 'b']).streams[:2] == [reader.keys.stream('a'), reader.keys.stream('b')]


@pytest.mark.parametrize('strategy, order', [('sorted', ['a', 'b', 'c']), ('priority', ['c', 'a', 'b'])])
def test_sorted_and_priority_orders_stay_put(strategy, order):
    reader = make_reader(queue_order_strategy=strategy)
    for _ in range(3):
        plan = reader.plan(['c', 'a', 'b'])
        assert plan.queues == order
        assert plan.streams == expected_streams(reader, (0, 3, 6, 9), order)


@pytest.mark.parametrize('semantics', ['kombu', 'rabbitmq'])
def test_a_broadcast_queue_is_read_in_bucket_zero_only(semantics):
    reader = make_reader(FakeTable(broadcast={'fan'}), priority_semantics=semantics,
                         queue_order_strategy='sorted')
    plan = reader.plan(['a', 'fan'])
    order = reader.options.bucket_order
    assert plan.streams == expected_streams(reader, order, ['a', 'fan'], broadcast={'fan'})
    assert [s for s in plan.streams if 'fan' in s] == [reader.keys.stream('fan')]
    assert plan.optional == ''.join('00' if bucket == 0 else '1' for bucket in order)
    assert len(plan.optional) == len(plan.streams)


def test_a_deleted_queue_is_left_out_and_a_queue_given_twice_is_read_once():
    reader = make_reader(FakeTable(deleted={'gone'}), queue_order_strategy='priority')
    plan = reader.plan(['a', 'gone', 'b', 'a'])
    assert plan.queues == ['a', 'b']
    assert plan.streams == expected_streams(reader, (0, 3, 6, 9), ['a', 'b'])
    assert len(set(plan.streams)) == len(plan.streams)


def test_a_plan_of_deleted_queues_only_names_no_stream():
    reader = make_reader(FakeTable(deleted={'gone'}))
    assert tuple(reader.plan(['gone'])) == ([], [], b'', '')


def test_a_layout_is_reused_until_the_queue_table_changes(monkeypatch):
    table = FakeTable()
    reader = make_reader(table)
    laid_out = []
    lay_out = reader._lay_out
    monkeypatch.setattr(reader, '_lay_out', lambda queues: laid_out.append(queues) or lay_out(queues))

    first, second = reader.plan(['a', 'b']), reader.plan(['a', 'b'])
    assert laid_out == [('a', 'b')]
    assert second.queues is first.queues   # the cached layout's
    assert second.streams != first.streams   # rotated all the same

    reader.plan(['b', 'c'])   # another set of queues: a layout of its own
    assert laid_out == [('a', 'b'), ('b', 'c')]

    table.deleted.add('b')
    assert reader.plan(['a', 'b']).queues is first.queues   # same version: not looked at again
    table.version += 1
    third = reader.plan(['a', 'b'])
    assert laid_out[-1] == ('a', 'b') and len(laid_out) == 3
    assert third.queues == ['a'] and third.queues is not first.queues


@pytest.mark.parametrize('noack', [False, True])
def test_the_blocking_read_names_every_stream_once_but_the_refused(noack):
    reader = make_reader(queue_order_strategy='sorted')
    refused = reader.keys.stream('b', 3)
    reader.queues.refused = {refused, 'elsewhere'}
    plan = reader.plan(['a', 'b'])
    packed = reader._packed_blocking_read(plan, noack)

    streams = [s for s in plan.streams if s != refused]
    assert len(streams) == len(plan.streams) - 1
    assert packed == wire.pack(['XREADGROUP', 'GROUP', 'g', 'c1', 'COUNT', 1, 'BLOCK', 250,
                                *(['NOACK'] if noack else []), 'STREAMS',
                                *streams, *['>'] * len(streams)])
    assert reader.scheduler.asked == [(1000, ['a', 'b'])]   # polling_interval 1 s, shortened


def test_the_blocking_read_without_refused_streams_is_the_plans():
    reader = make_reader(polling_interval=0.1)
    plan = reader.plan(['a', 'b'])
    assert reader._packed_blocking_read(plan, False) == wire.pack(
        ['XREADGROUP', 'GROUP', 'g', 'c1', 'COUNT', 1, 'BLOCK', 100, 'STREAMS',
         *plan.streams, *['>'] * len(plan.streams)])


def test_the_budget_read_is_the_read_script_over_the_plans_streams():
    reader = make_reader()
    plan = reader.plan(['a', 'b'])
    assert reader._packed_budget_read(plan, 7, True) == wire.pack(
        ['EVALSHA', '5ha', len(plan.streams), *plan.streams, 'g', 'c1', 7, '1', plan.optional])


# -- 4. fanout patterns --------------------------------------------------------------------

@pytest.mark.parametrize('bound, routing_key, matches', [
    ('', 'anything', True),
    ('', None, True),
    (None, 'anything', True),
    ('#', 'a.b.c', True),
    ('#', None, True),
    ('a.b', 'a.b', True),
    ('a.b', 'a.c', False),
    ('a.b', 'A.B', False),       # case matters
    ('a.b', None, False),
    ('a.*', 'a.b', True),
    ('a.*', 'b.a', False),
    ('*.b', 'a.b', True),
    ('a.#', 'a.b.c', True),
    ('a.#', 'b.a.c', False),
    ('#.c', 'a.b.c', True),
    ('a.*', 'a.b.c', True),      # kombu's Redis: '*' is a glob, dots and all
    ('*', None, True),           # no routing key is the empty one
    ('a', None, False),
])
def test_fanout_matches(bound, routing_key, matches):
    assert fanout_matches(bound, routing_key) is matches


# -- 5. ClusterLanes.route -----------------------------------------------------------------

class FakeClient:
    """``redis.Redis`` as lanes make it (no socket): what Lane.close touches."""

    def __init__(self, connection_pool, single_connection_client=False):
        assert single_connection_client
        self.connection_pool = connection_pool
        self.connection = SimpleNamespace(_sock=object(), disconnect=self._disconnect)
        self.closed = False
        self.disconnects = 0

    def _disconnect(self):
        self.disconnects += 1

    def close(self):
        self.closed = True


@pytest.fixture
def no_sockets(monkeypatch):
    """Lanes make :class:`FakeClient` instead of ``redis.Redis``."""
    monkeypatch.setattr(lanes, 'redis', SimpleNamespace(Redis=FakeClient))


def fake_cluster():
    """A cluster of three masters, slot % 3 the one that owns it."""
    def get_node_from_slot(slot):
        return SimpleNamespace(host='node%d' % (slot % 3), port=7000 + slot % 3)
    return SimpleNamespace(nodes_manager=SimpleNamespace(get_node_from_slot=get_node_from_slot))


def cluster_lanes():
    opened = []

    def open_pool(host, port):
        opened.append((host, port))
        return SimpleNamespace(address=(host, port), disconnect=lambda: None)
    return lanes.ClusterLanes(fake_cluster(), open_pool, stream_of=lambda queue: queue), opened


TAGS = ('a', 'b', 'c')


def test_tags_lie_in_different_slots():
    assert len({slots.slot_of(tag) for tag in TAGS}) == len(TAGS)


def test_route_gives_the_queues_of_one_slot_one_lane(no_sockets):
    cluster, opened = cluster_lanes()
    queues = ['{a}1', '{b}1', '{a}2', '{c}1', '{b}2']
    routes = cluster.route(queues)
    by_tag = {lane_queues[0][1]: (lane, lane_queues) for lane, lane_queues in routes}
    assert {tag: q for tag, (_, q) in by_tag.items()} == {
        'a': ['{a}1', '{a}2'], 'b': ['{b}1', '{b}2'], 'c': ['{c}1']}
    assert sorted(q for _, lane_queues in routes for q in lane_queues) == sorted(queues)
    assert len({id(lane) for lane, _ in routes}) == 3
    assert sorted(cluster.lanes(), key=id) == sorted((lane for lane, _ in routes), key=id)
    for tag, (lane, _) in by_tag.items():   # each lane on the master of its slot
        slot = slots.slot_of(tag)
        assert lane.client.connection_pool.address == ('node%d' % (slot % 3), 7000 + slot % 3)
    assert len(opened) == 3


def test_route_turns_the_order_of_the_lanes_and_keeps_them(no_sockets):
    cluster, opened = cluster_lanes()
    queues = ['{a}1', '{b}1', '{c}1']
    orders = [[lane_queues for _, lane_queues in cluster.route(queues)] for _ in range(3)]
    assert [order[0] for order in orders] != [orders[0][0]] * 3
    assert sorted(order[0][0] for order in orders) == sorted(queues)   # each slot first once
    for order in orders:
        assert sorted(q for lane_queues in order for q in lane_queues) == sorted(queues)
    assert len(opened) == 3   # the same lanes every time


def test_route_closes_a_lane_no_queue_needs_once_its_read_is_in(no_sockets):
    cluster, _ = cluster_lanes()
    routes = dict((lane_queues[0], lane) for lane, lane_queues in cluster.route(['{a}1', '{b}1', '{c}1']))
    b_lane, c_lane = routes['{b}1'], routes['{c}1']
    c_lane.outstanding = SimpleNamespace(carried=None)   # a read is out on c's lane

    routed = cluster.route(['{a}1'])
    assert [lane_queues for _, lane_queues in routed] == [['{a}1']]
    assert b_lane.client.closed and b_lane not in cluster.lanes()
    assert not c_lane.client.closed and c_lane in cluster.lanes()   # its reply is still to read
    assert not routes['{a}1'].client.closed

    c_lane.outstanding = None
    cluster.route(['{a}1'])
    assert c_lane.client.closed and cluster.lanes() == [routes['{a}1']]


@pytest.mark.parametrize('per_slot', [2, 4])
def test_round_robin_puts_every_queue_of_a_lane_first_in_turn(no_sockets, per_slot):
    """How Reader._send_reads uses them: each turn, every idle lane plans its queues. Each
    set of queues turns on its own: with one counter for every plan, a lane of a cluster
    saw only some shifts, and with 4 queues a slot some were never read first."""
    cluster, _ = cluster_lanes()
    reader = make_reader()
    reader.lanes = cluster
    queues = ['{a}%d' % i for i in range(per_slot)] + ['{b}%d' % i for i in range(per_slot)]
    first: Counter = Counter()
    for _ in range(4 * per_slot):
        for _, lane_queues in cluster.route(queues):
            first[reader.plan(lane_queues).streams[0]] += 1
    assert set(first) == {reader.keys.stream(q) for q in queues}


# -- 6. ServerLanes.follow_master ----------------------------------------------------------

def test_follow_master_drops_the_lanes_connection_once_per_move(no_sockets):
    moves = [0]
    server = lanes.ServerLanes(lambda: SimpleNamespace(disconnect=lambda: None), lambda: moves[0])
    server.follow_master()   # no lane yet, nothing moved
    assert server.lanes() == []

    lane = server.lane()
    lane.outstanding = SimpleNamespace(carried=None)
    server.follow_master()
    assert lane.client.disconnects == 0 and lane.outstanding is not None

    moves[0] = 1
    server.follow_master()
    assert lane.client.disconnects == 1 and lane.outstanding is None
    server.follow_master()
    assert lane.client.disconnects == 1   # once per move
    assert server.lanes() == [lane]       # the same lane reconnects (to the new master)

    moves[0] = 2
    server.follow_master()
    assert lane.client.disconnects == 2


def test_follow_master_with_no_lane_open_opens_none(no_sockets):
    moves = [0]
    server = lanes.ServerLanes(lambda: SimpleNamespace(disconnect=lambda: None), lambda: moves[0])
    moves[0] = 1
    server.follow_master()
    assert server.lanes() == []
    lane = server.lane()
    server.follow_master()   # the move was seen already
    assert lane.client.disconnects == 0
