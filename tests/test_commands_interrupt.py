"""Ctrl-C during ``celery streams drain | nuke | dead-letters purge``: a report, status 130,
and a second run that finishes the job.

The real ``celery`` command runs as a subprocess against a big stream (filled
fast by a Lua script), through a proxy that slows each round trip down so that
the bounded steps take seconds; SIGINT is sent once the server shows progress.
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

from benchmarks.drain_latency import FILL, READ
from celery_streams.scripts import DRAIN_STEP
from tests.helpers import streams_url, wait_until
from tests.proxy import proxy  # noqa: F401  (fixture)

ENTRIES, PENDING = 300_000, 100_000
#: Seconds the proxy holds each chunk: a step (one script call) takes at least twice that.
DELAY = 0.005
REPORT = re.compile(r'Interrupted: (\d+) of (\d+) (.*) so far \(a step under way may have '
                    r'finished too\)\. Run the same command again to finish the job\.')


def celery(url, prefix, *args, wait=True):
    command = [sys.executable, '-m', 'celery', '--broker', url, 'streams', '--prefix', prefix, *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        proc.communicate(timeout=120)
    return proc


def fill(client, stream, count, pending=0):
    """``count`` entries in ``stream``, the first ``pending`` of them delivered to group celery."""
    add, read = client.register_script(FILL), client.register_script(READ)
    for start in range(0, count, 20_000):
        add(keys=[stream], args=[min(20_000, count - start), 'x' * 40])
    if pending:
        client.xgroup_create(stream, 'celery', id='0', mkstream=True)
    done = 0
    while done < pending:
        done += read(keys=[stream], args=['celery', 'w1@host', min(20_000, pending - done)])


def left(client, stream):
    """Entries still in ``stream`` plus entries still pending in its groups."""
    if not client.exists(stream):
        return 0
    return client.xlen(stream) + sum(g['pending'] for g in client.xinfo_groups(stream))


def interrupt(proc, client, stream, total):
    """SIGINT ``proc`` once a few steps of ``stream`` are gone; its (stdout, stderr)."""
    wait_until(lambda: left(client, stream) < total - 3 * DRAIN_STEP or proc.poll() is not None, timeout=60,
               interval=0.01, what='the command to start removing entries')
    assert proc.poll() is None, 'it finished before it could be interrupted: %s' % (proc.communicate(),)
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=60)


def check_report(proc, out, err, client, stream, total):
    assert proc.returncode == 130, (out, err)
    assert 'Traceback' not in err, err
    [match] = [m for m in map(REPORT.match, err.splitlines()) if m]
    reported, planned = int(match.group(1)), int(match.group(2))
    assert planned == total and 0 < reported < total, err
    done = total - left(client, stream)
    assert 0 <= done - reported <= DRAIN_STEP, (done, reported)   # the step under way, at most
    assert left(client, stream) > 0   # it did stop
    return match.group(3)


@pytest.fixture
def slow(redis_server, proxy, prefix):  # noqa: F811
    """``(client, url through a slow proxy, direct url)`` of the session's server."""
    client = redis_server.client(decode_responses=True)
    link = proxy(redis_server.port)
    link.delay(DELAY)
    yield client, link.url().replace('redis://', 'redis-streams://', 1), streams_url(redis_server)
    for key in client.scan_iter(match=prefix + '*', count=1000):
        client.unlink(key)
    client.close()


def test_ctrl_c_during_drain_reports_and_a_second_run_finishes(slow, keys, prefix):
    client, url, direct = slow
    stream = keys.stream('big')
    client.hset(keys.queues, 'big', 'task')
    fill(client, stream, ENTRIES, PENDING)

    proc = celery(url, prefix, 'drain', '-f', '-Q', 'big', wait=False)
    out, err = interrupt(proc, client, stream, ENTRIES + PENDING)
    assert check_report(proc, out, err, client, stream, ENTRIES + PENDING) == (
        'entries removed or acked (messages, pending entries, dead letters, scheduled messages)')

    again = celery(direct, prefix, 'drain', '-f', '-Q', 'big')
    assert again.returncode == 0, again.stderr.read()
    assert left(client, stream) == 0
    assert [g['name'] for g in client.xinfo_groups(stream)] == ['celery']   # groups kept


def test_ctrl_c_during_nuke_reports_and_a_second_run_finishes(slow, keys, prefix):
    client, url, direct = slow
    stream = keys.stream('big')
    client.hset(keys.queues, 'big', 'task')
    fill(client, stream, ENTRIES, PENDING)

    proc = celery(url, prefix, 'nuke', '-y', wait=False)
    out, err = interrupt(proc, client, stream, ENTRIES + PENDING)
    check_report(proc, out, err, client, stream, ENTRIES + PENDING)

    again = celery(direct, prefix, 'nuke', '--yes')
    assert again.returncode == 0, again.stderr.read()
    assert not client.exists(stream, keys.queues)


def test_ctrl_c_during_purge_reports_and_a_second_run_finishes(slow, keys, prefix):
    client, url, direct = slow
    dead = keys.dead_letters('big')
    fill(client, dead, ENTRIES)

    proc = celery(url, prefix, 'dead-letters', 'purge', '-f', wait=False)
    out, err = interrupt(proc, client, dead, ENTRIES)
    assert check_report(proc, out, err, client, dead, ENTRIES) == 'dead letters deleted'

    again = celery(direct, prefix, 'dead-letters', 'purge', '-f')
    assert again.returncode == 0, again.stderr.read()
    assert not client.exists(dead)


DEAD = 10_000
DEAD_FILL = """
for i = 1, tonumber(ARGV[1]) do
    redis.call('XADD', KEYS[1], '*', 'reason', 'test', 'stream', KEYS[2], 'field:payload', ARGV[2])
end
"""


def test_ctrl_c_during_requeue_reports_and_a_second_run_finishes(slow, keys, prefix):
    client, url, direct = slow
    dead, stream = keys.dead_letters('big'), keys.stream('big')
    add = client.register_script(DEAD_FILL)
    add(keys=[dead, stream], args=[DEAD, '{}'])

    proc = celery(url, prefix, 'dead-letters', 'requeue', '-y', wait=False)
    out, err = interrupt(proc, client, dead, DEAD)
    assert check_report(proc, out, err, client, dead, DEAD) == 'dead letters requeued'
    assert client.xlen(stream) + client.xlen(dead) == DEAD   # each one in one place

    again = celery(direct, prefix, 'dead-letters', 'requeue', '-y')
    assert again.returncode == 0, again.stderr.read()
    assert (client.exists(dead) and client.xlen(dead), client.xlen(stream)) == (0, DEAD)
