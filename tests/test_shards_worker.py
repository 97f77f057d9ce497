"""Sharded queues (issue #25) with real ``celery worker`` processes on a Redis Cluster.

One cluster of 3 masters and 3 replicas per server kind (Redis 7, Valkey 8), for the
module. Each test has a :class:`~tests.rigs.ClusterRig` under a prefix of its own and
one queue, ``hot``, sharded with :func:`celery_streams.shards.set_count` (what
``celery streams shards set`` does; the resharding test runs the command itself) before
its workers start. Workers run ``tests/apps/rig.py``, whose task records every
execution in a journal on a server outside the cluster.

Every test looks at where the messages went on the servers: the ``entries-added`` of
``XINFO STREAM`` of every stream of every shard (server-side, never reset by an ack or a
trim), read from the master that owns it. Without sharding they would all be on one
master, and each test says which of its assertions would fail. The tests that move a
slot or kill a master come last. Figures are printed: run with ``-s``.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from collections import Counter
from zlib import crc32

import pytest
from redis.crc import key_slot

import celery_streams  # noqa: F401  (registers redis-streams+cluster://)
from celery_streams import shards
from tests import rigs
from tests.rigs import RECORD, ClusterRig, Publisher
from tests.workers import celery_command

pytestmark = [pytest.mark.needs_server, pytest.mark.slow]

journal_server = rigs.journal_server   # the fixture

QUEUE = 'hot'
TO_HOT = [{'queue': QUEUE}]


@pytest.fixture
def rig(cluster, journal_server, unique_name):
    with ClusterRig(cluster, journal_server, unique_name + ':') as rig:
        yield rig


# -- helpers -------------------------------------------------------------------------------

def set_shards(rig, number, queue=QUEUE) -> tuple:
    """Shard ``queue`` in ``number``; the names of its shards (every one placed)."""
    client = rig.redis()
    try:
        return shards.set_count(client, rig.keys, queue, number).names
    finally:
        client.close()


def placement(rig, queue=QUEUE):
    client = rig.redis()
    try:
        return shards.read(client, rig.keys).get(queue)
    finally:
        client.close()


def cli(rig, *args) -> str:
    """``celery -A tests.apps.rig streams *args`` on the rig's broker and prefix; its output."""
    done = subprocess.run(celery_command('streams', *args, app=rigs.APP), env=rig.worker_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def added(rig, names, buckets=None) -> dict:
    """``{shard: (port of its master, entries ever added to its streams)}``: ``XINFO STREAM``
    ``entries-added`` over the streams of each shard (the priority ``buckets`` given, by
    default all), read where the cluster routes them."""
    client = rig.redis()
    found = {}
    try:
        for name in names:
            streams = rig.keys.streams(name) if buckets is None else \
                [rig.keys.stream(name, bucket) for bucket in buckets]
            port = client.get_node_from_key(rig.keys.stream(name)).port
            total = 0
            for stream in streams:
                if client.exists(stream):
                    info = client.xinfo_stream(stream)
                    total += int(info.get('entries-added', info.get(b'entries-added', 0)))
            found[name] = (port, total)
    finally:
        client.close()
    return found


def by_master(found) -> Counter:
    """``{port: entries}`` of what :func:`added` found."""
    counts = Counter()
    for port, total in found.values():
        counts[port] += total
    return counts


def run_all(rig, tokens, timeout=60):
    """Wait until every token ran; the journal's counts (what did not run, and where the
    rig's streams stand, in the failure)."""
    if rig.wait_ran(tokens, timeout=timeout) is None:
        missing = sorted(set(tokens) - set(rig.ran()))
        raise AssertionError('%d did not run, e.g. %s; streams: %s' % (
            len(missing), missing[:10], stream_states(rig)))
    return rig.ran()


def stream_states(rig) -> dict:
    """``{stream key: (length, groups and their pending)}`` of the rig's streams, every master."""
    states = {}
    for master in rig.cluster.primaries():
        with master.client() as node:
            for key in node.scan_iter(match=rig.keys.prefix + '*', count=1000, _type='stream'):
                groups = [(g['name'], g['pending'], g['last-delivered-id']) for g in node.xinfo_groups(key)]
                states[key] = (node.xlen(key), groups)
    return states


def settle_pending(rig, names, timeout=10):
    deadline = time.monotonic() + timeout
    while rig.pending(names) and time.monotonic() < deadline:
        time.sleep(0.1)
    return rig.pending(names)


def status_queues(rig) -> dict:
    return {q['name']: q for q in json.loads(cli(rig, 'status', '--json'))['queues']}


def transport_keys_by_master(rig) -> Counter:
    """``{port: number of the rig's transport keys}`` on each master."""
    counts = Counter()
    for master in rig.cluster.primaries():
        with master.client() as node:
            counts[master.port] = sum(1 for _ in node.scan_iter(match=rig.keys.prefix + '*', count=1000))
    return counts


def send(app, tokens, **options):
    for token in tokens:
        app.send_task(RECORD, args=(token,), queue=QUEUE, **options)


# -- spread, order, delayed and priority -----------------------------------------------------

def test_a_sharded_queue_spreads_over_three_masters_and_every_task_runs_once(rig, report):
    names = set_shards(rig, 3)
    masters = {port for port, _ in added(rig, names).values()}
    assert len(names) == 3 and names[0] == QUEUE and len(masters) == 3, (names, masters)
    worker = rig.worker('-P', 'threads', '-c', '4', queues=[QUEUE])
    tokens = ['t%d' % i for i in range(300)]
    started = time.monotonic()
    send(rig.client_app(), tokens)
    ran = run_all(rig, tokens)
    took = time.monotonic() - started
    assert [t for t in tokens if ran[t] != 1] == []
    spread = by_master(added(rig, names))
    report(tasks=len(tokens), seconds=took, per_master=dict(spread))
    # Without sharding: 300 on one master, 0 on the others.
    assert len(spread) == 3 and sum(spread.values()) == 300, spread
    assert min(spread.values()) >= 60, spread   # round robin: about 100 each
    assert settle_pending(rig, names) == 0
    assert 'Traceback' not in worker.text()


def test_one_shard_key_runs_in_publish_order_while_other_keys_interleave(rig, report):
    names = set_shards(rig, 3)
    # Two keys on each shard (crc32(key) mod 3, the documented choice).
    keys, wanted = [], Counter()
    for i in range(100):
        key = 'k%d' % i
        if wanted[crc32(key.encode()) % 3] < 2:
            wanted[crc32(key.encode()) % 3] += 1
            keys.append(key)
        if len(keys) == 6:
            break
    app = rig.client_app()
    published = {key: [] for key in keys}
    for n in range(25):
        if n == 10:   # a backlog on every shard first, the rest while the worker runs
            rig.worker('-P', 'solo', '-c', '1', queues=[QUEUE])
        for key in keys:
            token = '%s-%d' % (key, n)
            app.send_task(RECORD, args=(token,), queue=QUEUE, headers={shards.HEADER: key})
            published[key].append(token)
    every = [t for tokens in published.values() for t in tokens]
    ran = run_all(rig, every)
    assert [t for t in every if ran[t] != 1] == []
    order = [token for token in rig.listed('ran')]
    for key in keys:
        assert [t for t in order if t.rsplit('-', 1)[0] == key] == published[key], key
    switches = sum(1 for a, b in zip(order, order[1:]) if a.rsplit('-', 1)[0] != b.rsplit('-', 1)[0])
    # Each key on the shard its hash picks: 2 keys x 25 tasks a shard, each on its own master.
    found = added(rig, names)
    expected = Counter()
    for key in keys:
        expected[names[crc32(key.encode()) % 3]] += 25
    report(tasks=len(every), key_switches=switches, per_shard={n: t for n, (_, t) in found.items()})
    # Without sharding: all 150 in one stream on one master.
    assert {name: total for name, (_, total) in found.items()} == expected
    assert len({port for port, _ in found.values()}) == 3
    assert switches >= len(keys), order[:30]   # not one key after another


def test_countdowns_and_priorities_on_a_sharded_queue(rig, report):
    names = set_shards(rig, 3)
    rig.worker('-P', 'threads', '-c', '4', queues=[QUEUE])
    app = rig.client_app()
    plain, urgent, later = (['%s%d' % (stem, i) for i in range(30)] for stem in 'puc')
    sent_at = time.time()
    send(app, later, countdown=4)
    scheduled = {}
    client = rig.redis()
    try:
        for name in names:   # read before they are due: which masters hold them
            scheduled[name] = (client.get_node_from_key(rig.keys.scheduled(name)).port,
                               client.zcard(rig.keys.scheduled(name)))
    finally:
        client.close()
    send(app, urgent, priority=9)
    send(app, plain)
    ran = run_all(rig, plain + urgent + later, timeout=60)
    assert [t for t in plain + urgent + later if ran[t] != 1] == []
    times = {token: t for t, token in rig.run_times()}
    early = [t for t in later if times[t] < sent_at + 3.5]
    prioritized = added(rig, names, buckets=[b for b in rig.keys.priority_steps if b])
    report(scheduled=dict(Counter({p: n for p, n in scheduled.values()})),
           priority_buckets={n: t for n, (_, t) in prioritized.items()})
    assert early == []
    # Without sharding: one schedule and one priority bucket, on one master.
    assert len({port for port, n in scheduled.values() if n}) == 3, scheduled
    assert sum(n for _, n in scheduled.values()) == 30
    assert len({port for port, n in prioritized.values() if n}) == 3, prioritized
    assert sum(n for _, n in prioritized.values()) == 30
    assert settle_pending(rig, names) == 0


# -- operator commands -----------------------------------------------------------------------

def test_status_and_drain_see_one_queue_and_workers_consume_after_a_drain(rig, report):
    names = set_shards(rig, 3)
    worker = rig.worker('-P', 'threads', '-c', '2', queues=[QUEUE])
    app = rig.client_app()
    first = ['a%d' % i for i in range(30)]
    send(app, first)
    run_all(rig, first)
    assert settle_pending(rig, names) == 0
    worker.pause()
    try:
        waiting = ['w%d' % i for i in range(90)]
        send(app, waiting)
        client = rig.redis()
        try:
            lengths = {name: (client.get_node_from_key(rig.keys.stream(name)).port,
                              client.xlen(rig.keys.stream(name))) for name in names}
        finally:
            client.close()
        assert len({port for port, n in lengths.values() if n}) == 3, lengths   # 1 without sharding
        found = status_queues(rig)
        assert [q for q in found if q.startswith(QUEUE)] == [QUEUE], sorted(found)
        assert found[QUEUE]['length'] == 90, found[QUEUE]
        assert [sh['name'] for sh in found[QUEUE]['shards']] == list(names), found[QUEUE]
        listed = json.loads(cli(rig, 'shards', 'list', '--json'))
        drained = cli(rig, 'drain', '-f')
    finally:
        worker.resume()
    report(lengths={n: length for n, (_, length) in lengths.items()}, shards_list=listed)
    [(removed, handed)] = re.findall(r"Drained queue '%s' \([^)]*\): (\d+) messages?, (\d+) pending"
                                     % QUEUE, drained) or [(None, None)]
    assert removed is not None and QUEUE + shards.SHARD_SEP not in drained, drained
    assert int(removed) == 90, drained
    assert [q['queue'] for q in listed] == [QUEUE] and len(listed[0]['shards']) == 3, listed
    client = rig.redis()
    try:
        for name in names:   # every shard empty, its group kept
            stream = rig.keys.stream(name)
            assert client.xlen(stream) == 0, name
            assert [g['name'] for g in client.xinfo_groups(stream)] == ['celery'], name
    finally:
        client.close()
    after = ['z%d' % i for i in range(60)]
    send(app, after)
    ran = run_all(rig, after)
    time.sleep(1.0)
    assert [t for t in after if ran[t] != 1] == []
    # The paused worker's outstanding reads had been answered (its entries pending): those
    # were its own before the drain, and may run; no other drained task does.
    assert len(set(waiting) & set(ran)) <= int(handed), (handed, sorted(set(waiting) & set(ran)))
    assert len([port for port, n in by_master(added(rig, names)).items() if n]) == 3
    assert 'Traceback' not in worker.text()


def test_celery_purge_empties_every_shard_of_the_queue(rig, report):
    """``celery purge -Q hot`` counts and empties the queue's shards on every master, as one
    queue; a worker started afterwards runs what comes next and nothing purged."""
    names = set_shards(rig, 3)
    app = rig.client_app()
    purged = ['x%d' % i for i in range(60)]
    send(app, purged)
    held = by_master(added(rig, names))
    done = subprocess.run(celery_command('purge', '-Q', QUEUE, '-f', app=rigs.APP),
                          env=rig.worker_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    client = rig.redis()
    try:
        lengths = {name: client.xlen(rig.keys.stream(name)) for name in names}
    finally:
        client.close()
    rig.worker('-P', 'threads', '-c', '2', queues=[QUEUE])
    after = ['y%d' % i for i in range(30)]
    send(app, after)
    ran = run_all(rig, after)
    time.sleep(1.0)
    report(per_master=dict(held), output=done.stdout.strip())
    # Without sharding: 60 on one master.
    assert len([port for port, n in held.items() if n]) == 3 and sum(held.values()) == 60, held
    assert 'Purged 60 messages from 1 known task queue' in done.stdout, done.stdout
    assert lengths == {name: 0 for name in names}, lengths
    assert [t for t in after if ran[t] != 1] == [] and not set(purged) & set(ran)


def test_nuke_removes_every_shard_and_running_workers_heal(rig, report):
    names = set_shards(rig, 3)
    worker = rig.worker('-P', 'threads', '-c', '2', queues=[QUEUE])
    app = rig.client_app()
    before = ['b%d' % i for i in range(30)]
    send(app, before)
    run_all(rig, before)
    held = transport_keys_by_master(rig)
    worker.pause()   # nothing re-created while the keys are looked at
    try:
        nuked = cli(rig, 'nuke', '-f')
        left = transport_keys_by_master(rig)
    finally:
        worker.resume()
    after = ['n%d' % i for i in range(60)]
    send(app, after)
    ran = run_all(rig, after, timeout=60)
    report(keys_before=dict(held), keys_after_nuke=dict(left), shards=len(names))
    # Without sharding the queue's keys are on one master.
    assert len([port for port, n in held.items() if n]) == 3, held
    assert sum(left.values()) == 0, left
    assert 'Destroyed' in nuked, nuked
    assert [t for t in after if ran[t] != 1] == []
    assert 'Traceback' not in worker.text()


def test_resharding_one_three_two_while_publishing_loses_nothing(rig, report):
    """1 shard, then 3, then 2, with ``celery streams shards set`` while a publisher and two
    workers run: the shards added are used at once, the one left out stops receiving and
    drains, and every task runs exactly once (no fault: no duplicate either)."""
    set_shards(rig, 1)
    rig.worker('-P', 'threads', '-c', '4', queues=[QUEUE], name='w1')
    rig.worker('-P', 'solo', queues=[QUEUE], name='w2')
    publisher = Publisher(rig.client_app(), routes=TO_HOT, interval=0.01)
    publisher.start()
    try:
        time.sleep(1.5)
        cli(rig, 'shards', 'set', QUEUE, '3')
        three = placement(rig).names
        time.sleep(3.0)
        at_three = added(rig, three)
        cli(rig, 'shards', 'set', QUEUE, '2')
        time.sleep(3 * shards.REFRESH + 2.0)   # every client has read the registry again
        left_out = added(rig, three[2:])
        time.sleep(2.0)
        still = added(rig, three[2:])
    finally:
        publisher.stop()
    tokens = publisher.tokens()
    listed = json.loads(cli(rig, 'shards', 'list', '--json'))
    ran = run_all(rig, tokens, timeout=60)
    twice = [t for t in tokens if ran[t] > 1]
    final = added(rig, three)
    report(published=len(tokens), failed=len(publisher.failed), ran_twice=len(twice),
           at_three={n: t for n, (_, t) in at_three.items()},
           final={n: t for n, (_, t) in final.items()}, shards_list=listed)
    assert publisher.failed == [] and twice == []
    assert len(three) == 3 and len({port for port, _ in final.values()}) == 3
    # The shards added took messages while N was 3 (nothing would without sharding) ...
    assert all(total > 0 for _, total in at_three.values()), at_three
    # ... and the one left out took none once everyone knew N was 2, yet it was drained.
    assert still == left_out, (left_out, still)
    [entry] = listed
    assert entry['queue'] == QUEUE and entry['count'] == 2, listed
    assert [(sh['name'], sh['publishing']) for sh in entry['shards']] == \
        [(three[0], True), (three[1], True), (three[2], False)], listed
    assert len({sh['master'] for sh in entry['shards']}) == 3, listed
    assert settle_pending(rig, three) == 0
    client = rig.redis()
    try:
        assert client.xlen(rig.keys.stream(three[2])) == 0 or \
            client.xpending(rig.keys.stream(three[2]), 'celery')['pending'] == 0
    finally:
        client.close()


# -- slots that move, masters that die (last: they change the cluster) --------------------------

def test_a_shard_whose_slot_moves_under_running_workers_loses_nothing(rig, report):
    names = set_shards(rig, 3)
    moving = names[1]
    target = rig.master_of(names[2])
    rig.worker('-P', 'threads', '-c', '4', queues=[QUEUE])
    publisher = Publisher(rig.client_app(), routes=TO_HOT, interval=0.005)
    publisher.start()
    try:
        time.sleep(1.5)
        moved_at = time.monotonic()
        rig.cluster.migrate_slot(key_slot(rig.keys.stream(moving).encode()), target)
        moved_in = time.monotonic() - moved_at
        at_move = added(rig, [moving])[moving][1]
        time.sleep(2.0)
    finally:
        publisher.stop()
    tokens = publisher.tokens()
    ran = run_all(rig, tokens)
    twice = [t for t in tokens if ran[t] > 1]
    found = added(rig, names)
    report(published=len(tokens), failed=len(publisher.failed), ran_twice=len(twice),
           migration=moved_in, moved_shard_before=at_move, moved_shard_after=found[moving][1])
    assert publisher.failed == [] and twice == []
    assert found[moving][0] == target.port
    # Published to on its new master after the move (without sharding: never published to).
    assert found[moving][1] > at_move
    assert all(total for _, total in found.values())
    assert settle_pending(rig, names) == 0 or not time.sleep(3) and settle_pending(rig, names) == 0


@pytest.mark.parametrize('how', ['cluster-failover', 'kill-master'])
def test_a_master_failing_over_under_a_sharded_queue_loses_nothing(rig, report, how):
    names = set_shards(rig, 3)
    victim_shard = names[1]
    victim = rig.master_of(victim_shard)
    rig.worker('-P', 'threads', '-c', '4', queues=[QUEUE])
    publisher = Publisher(rig.client_app(), routes=TO_HOT, interval=0.005)
    publisher.start()
    try:
        time.sleep(1.5)
        killed_at, killed_wall = time.monotonic(), time.time()
        promoted = rig.cluster.kill(victim) if how == 'kill-master' else rig.cluster.fail_over(victim)
        failover = time.monotonic() - killed_at
        at_failover = added(rig, [victim_shard])[victim_shard]
        time.sleep(2.0)
    finally:
        publisher.stop()
    stopped_wall = time.time()
    tokens = publisher.tokens()
    ran = run_all(rig, tokens, timeout=90)
    after = publisher.returned_after(killed_at)
    found = added(rig, names)
    report(how=how, published=len(tokens), after_failover=len(after), failed=len(publisher.failed),
           ran_twice=sum(1 for t in tokens if ran[t] > 1), failover=failover,
           worker_ran_nothing_for=rig.longest_pause(killed_wall, stopped_wall),
           per_shard={n: t for n, (_, t) in found.items()})
    assert after, 'nothing was published after the failover: the test proves nothing'
    assert at_failover[0] == promoted.port
    # The failed master's shard, on its replica now, kept taking messages.
    assert found[victim_shard][0] == promoted.port and found[victim_shard][1] > at_failover[1]
    assert len({port for port, _ in found.values()}) == 3
