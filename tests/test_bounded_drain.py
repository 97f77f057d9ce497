"""Drain, nuke and dead-letter purge in bounded steps: Redis keeps answering other clients.

One script call per stream (the old drain) blocked every client for as long as
the whole stream took: 200k entries with 150k pending, 170-230 ms here, half a
second for a million, seconds for a multi-million backlog. Now each ``drain``
script call acks and trims at most ``DRAIN_STEP`` entries (about a
millisecond), and the caller loops.

The tests check that structure, not a duration: the server's own count of
script calls (``INFO commandstats``, reset before the operation) is at least
one per ``DRAIN_STEP`` entries, and no step reports more than ``DRAIN_STEP``.
A one-shot version makes one call and fails. How long a PING waited meanwhile
is reported (``report``: at the end of the run), not asserted: on a
2-core machine running the suite in parallel it measures the machine's load
as much as the steps. ``python -m benchmarks drain-latency`` measures it alone.

Each test runs on a private server of the session's kind started with
``stream-node-max-entries 1``: one entry per stream node, as every payload
over ``stream-node-max-bytes`` (4 KB) gets -- the worst case for trimming (no
whole-node shortcut) and for freeing a stream.
"""
from __future__ import annotations

import io
import threading
import time

import click
import pytest

from benchmarks.drain_latency import FILL, READ   # fill a stream fast, make entries pending
from celery_streams import admin
from celery_streams.cli.base import PROGRESS_MIN, progress_bar
from celery_streams.scripts import DRAIN_STEP, Scripts

PAYLOAD = '{"body": "%s", "properties": {}}' % ('x' * 60)


def fill(client, stream, count):
    """Append ``count`` entries to ``stream``, 20,000 per script call."""
    script = client.register_script(FILL)
    for start in range(0, count, 20_000):
        script(keys=[stream], args=[min(20_000, count - start), PAYLOAD])


def read(client, stream, group, consumer, count):
    """Deliver ``count`` new entries to ``consumer`` (pending until acked), without reading them here."""
    script = client.register_script(READ)
    done = 0
    while done < count:
        got = script(keys=[stream], args=[group, consumer, min(20_000, count - done)])
        assert got, 'fewer entries than asked'
        done += got


class Pinger(threading.Thread):
    """PINGs ``server`` on its own connection, about every millisecond; ``worst``: the slowest.

    Measured to be printed, not asserted (see the module's docstring).
    """

    def __init__(self, server):
        super().__init__(daemon=True)
        self.client = server.client()
        self.latencies: list[float] = []
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            started = time.perf_counter()
            self.client.ping()
            self.latencies.append(time.perf_counter() - started)
            time.sleep(0.001)

    def __enter__(self):
        self.start()
        time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        time.sleep(0.02)
        self.done.set()
        self.join()
        self.client.close()

    @property
    def worst(self) -> float:
        return max(self.latencies)


def script_calls(client) -> int:
    """Script calls the server ran since its last ``CONFIG RESETSTAT``."""
    stats = client.info('commandstats')
    return sum(stats.get('cmdstat_' + name, {}).get('calls', 0) for name in ('evalsha', 'eval'))


class Steps:
    """``with Steps(server, report) as steps:`` run an operation with
    ``progress=steps.append``; then :meth:`check` it was done in bounded steps."""

    def __init__(self, server, report):
        self.client = server.client()
        self.pinger = Pinger(server)
        self.report = report
        self.sizes: list[int] = []
        self.calls = 0

    def append(self, n: int) -> None:
        self.sizes.append(n)

    def __enter__(self):
        self.client.config_resetstat()
        self.pinger.__enter__()
        return self

    def __exit__(self, *exc):
        self.pinger.__exit__(*exc)
        self.calls = script_calls(self.client)
        self.client.close()
        self.report(steps=len(self.sizes), script_calls=self.calls,
                    worst_ping='%.1f ms' % (self.pinger.worst * 1000))

    def check(self, total: int) -> None:
        """``total`` entries in steps of at most ``DRAIN_STEP``, each its own script call."""
        assert sum(self.sizes) == total
        assert max(self.sizes) <= DRAIN_STEP
        assert self.calls >= len(self.sizes), 'fewer script calls than steps: %d < %d' % (
            self.calls, len(self.sizes))


@pytest.fixture
def big(redis_server, fresh_redis_server):
    """A private server of the session's kind, one stream entry per node."""
    return fresh_redis_server(redis_server.name, extra_args=['--stream-node-max-entries', '1'])


def groups_kept(client, stream):
    """XINFO GROUPS less what a drain changes (PEL sizes, lag): names, positions, consumers."""
    return [({k: v for k, v in g.items() if k not in ('pending', 'lag')},
             sorted(c['name'] for c in client.xinfo_consumers(stream, g['name'])))
            for g in client.xinfo_groups(stream)]


def test_drain_of_a_big_queue_in_steps(big, prefix, streams_state, report):
    st = streams_state(big, prefix)
    st.task_queue('big')
    r, stream = st.redis, st.keys.stream('big')
    fill(r, stream, 200_000)
    read(r, stream, 'celery', 'w1@host:1:abcdef', 150_000)
    before = groups_kept(r, stream)

    [plan] = admin.drain(r, global_keyprefix=prefix, queues=['big'], dry_run=True)
    assert (plan.removed, plan.pending_cleared) == (200_000, 150_000)
    after = r.xadd(stream, {'payload': 'published after the plan'})
    with Steps(big, report) as steps:
        [done] = admin.apply_drain(r, [plan], global_keyprefix=prefix, progress=steps.append)

    assert (done.removed, done.pending_cleared, done.groups_kept) == (200_000, 150_000, ['celery'])
    assert [entry_id for entry_id, _ in r.xrange(stream)] == [after]
    assert r.xpending(stream, 'celery')['pending'] == 0
    assert groups_kept(r, stream) == before
    steps.check(350_000)


def test_no_step_boundary_lets_a_drained_entry_come_back(big, prefix, streams_state):
    """Between two steps a worker stops and restores what it holds, another one reads on:
    whatever a step acked or trimmed stays gone; what no step reached yet is put back
    (restore.lua) as a new entry, after the plan like a message published then, and stays."""
    st = streams_state(big, prefix)
    st.task_queue('big')
    r, stream = st.redis, st.keys.stream('big')
    fill(r, stream, 8 * DRAIN_STEP)
    read(r, stream, 'celery', 'w1@host:1:abcdef', 3 * DRAIN_STEP)   # the rest: not delivered yet
    held = [e['message_id'] for e in r.xpending_range(stream, 'celery', '-', '+', 10 ** 6)]
    [plan] = admin.drain(r, global_keyprefix=prefix, queues=['big'], dry_run=True)
    last = plan.until[stream]
    scripts = Scripts(r)
    steps: list[int] = []
    came_back: list[str] = []
    late: list[str] = []

    def restore(consumer, entry_id):
        return scripts.restore(keys=[stream], args=['celery', consumer, entry_id, '0'])

    def boundary(n):
        steps.append(n)
        pending = {e['message_id'] for e in r.xpending_range(stream, 'celery', '-', '+', 10 ** 6)}
        for entry_id in [i for i in held if i not in pending]:   # a step cleared it
            assert restore('w1@host:1:abcdef', entry_id) is None
            held.remove(entry_id)
        if len(steps) == 2:   # two steps acked 2 * DRAIN_STEP: the worker stops now
            came_back.extend(restore('w1@host:1:abcdef', entry_id) for entry_id in held)
            held.clear()
        if len(steps) == 3:   # trimming now: another worker reads entries nobody read yet
            [[_, entries]] = r.xreadgroup('celery', 'w2@host:2:abcdef', {stream: '>'}, count=10)
            late.extend(entry_id for entry_id, _ in entries)

    admin.apply_drain(r, [plan], global_keyprefix=prefix, progress=boundary)

    assert len(came_back) == DRAIN_STEP and all(new_id > last for new_id in came_back)
    assert len(late) == 10 and all(entry_id <= last for entry_id in late)
    assert r.xpending(stream, 'celery')['pending'] == 0   # the late reads were acked too
    for entry_id in late:   # trimmed and acked: the late reader cannot put them back
        assert restore('w2@host:2:abcdef', entry_id) is None
    assert [entry_id for entry_id, _ in r.xrange(stream)] == came_back


def test_dead_letter_purge_in_steps(big, prefix, streams_state, report):
    st = streams_state(big, prefix)
    st.task_queue('big')
    r, dead = st.redis, st.keys.dead_letters('big')
    fill(r, dead, 400_000)

    [plan] = admin.purge_dead_letters(r, global_keyprefix=prefix, dry_run=True)
    assert plan.removed == 400_000
    after = r.xadd(dead, {'reason': 'dead-lettered after the plan'})
    with Steps(big, report) as steps:
        [done] = admin.apply_purge(r, [plan], progress=steps.append)

    assert done.removed == 400_000
    assert [entry_id for entry_id, _ in r.xrange(dead)] == [after]
    steps.check(400_000)


def test_nuke_of_a_big_stream_in_steps(big, prefix, streams_state, report):
    """Ten consumer groups (a broadcast queue's, say), each with 150k pending entries:
    XGROUP DESTROY frees a PEL entry by entry, so nuke acks them away in steps first."""
    st = streams_state(big, prefix)
    st.task_queue('big')
    r, stream = st.redis, st.keys.stream('big')
    fill(r, stream, 150_000)
    groups = ['celery'] + ['g%d' % i for i in range(1, 10)]
    for group in groups:
        if group != 'celery':
            r.xgroup_create(stream, group, '0')
        read(r, stream, group, 'w1@host:1:abcdef', 150_000)

    plan = admin.nuke(r, global_keyprefix=prefix, dry_run=True)
    assert (plan.messages, plan.pending) == (150_000, 10 * 150_000)
    assert sorted(g for s, g in plan.groups if s == stream) == groups
    with Steps(big, report) as steps:
        admin.apply_nuke(r, plan, global_keyprefix=prefix, progress=steps.append)

    assert list(r.scan_iter(match=st.keys.match_all)) == []
    steps.check(150_000 + 10 * 150_000)


# -- progress on a terminal -----------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal_and_for_long_runs():
    with progress_bar(PROGRESS_MIN, 'Draining', file=io.StringIO()) as progress:
        assert progress is None   # piped: nothing but the report
    with progress_bar(PROGRESS_MIN - 1, 'Draining', file=Terminal()) as progress:
        assert progress is None   # short: no bar
    out = Terminal()
    with progress_bar(PROGRESS_MIN, 'Draining', file=out) as progress:
        progress(PROGRESS_MIN // 2)
        progress(PROGRESS_MIN // 2)
    assert 'Draining' in out.getvalue() and '%d/%d' % (PROGRESS_MIN, PROGRESS_MIN) in out.getvalue()


def test_cli_drain_shows_progress_on_a_terminal_only(run, big, prefix, streams_state, monkeypatch):
    st = streams_state(big, prefix)
    st.task_queue('big')
    stream = st.keys.stream('big')
    args = ('--broker', st.url, 'streams', '--prefix', prefix, 'drain', '-f')

    fill(st.redis, stream, PROGRESS_MIN)
    piped = run(*args)
    assert piped.exit_code == 0, piped.output
    assert piped.output.splitlines()[1:3] == [
        "Drained queue 'big' (task): %d messages, 0 pending entries; groups kept: celery"
        % PROGRESS_MIN,
        'Total: %d messages and 0 pending entries from 1 queue.' % PROGRESS_MIN]

    fill(st.redis, stream, PROGRESS_MIN)
    terminal = Terminal()
    monkeypatch.setattr(click, 'get_text_stream', lambda name, *a, **kw: terminal)
    assert run(*args).output == piped.output
    assert 'Draining' in terminal.getvalue()
    assert st.redis.xlen(stream) == 0
