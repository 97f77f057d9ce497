"""``python -m benchmarks cluster [--rounds 3] [--messages N]``: many queues on 3 masters vs one Redis;
``python -m benchmarks cluster --hot-shards 3 [--quick]``: one hot queue, 3 shards vs 1 stream.

Two setups, started once and measured in turns (single, cluster, single, ...):

* ``single``: one private ``redis-server`` (``redis-streams://``);
* ``cluster``: a Redis Cluster of 3 masters and 3 replicas
  (:class:`tests.servers.ClusterTopology`, ``redis-streams+cluster://``).

The same load on both: 12 queues, named so that each master of the cluster owns
4 of them (the slot of ``celery-streams:q:{name}``); ``--publishers`` processes
publish ``--messages`` pre-serialized JSON bodies of about 300 bytes between
them, round-robin over the queues, through ``Producer.publish`` inside
``Producer.batch()`` (the default exchange: one ``XADD`` a message); then
``--consumers`` processes, each with one kombu ``Consumer`` on all 12 queues,
drain and ack them one by one. The two phases are timed apart: publish from
the start barrier to the last publisher's end of its batch (flushed and
confirmed), consume+ack from the start barrier to the last ack.

Server CPU is read from ``/proc/<pid>/stat`` (utime+stime, every thread) of
each server process around each phase: the masters summed, the replicas apart (a
master's CPU includes feeding its replica; the single server has none).
Client CPU is each worker process' own ``time.process_time``; machine CPU is
``/proc/stat``. Every message carries its number: each must be consumed exactly
once, and every stream must be left empty with nothing pending.

On a machine with few cores the Python clients, not Redis, may be what limits the
rate: the table says how busy the busiest Redis process was, and a note says so
when the single server was not saturated.

``--hot-shards N`` (issue #25, sharded queues) measures ONE queue, ``hot``, on the
same cluster of 3 masters, in two setups taken in turns: ``1 stream`` (the queue as
ever: one stream, on one master) and ``N shards`` (``sharded_queues={'hot': N}``,
written to the registry before the publish: :func:`celery_streams.shards.configure`).
Publish and consume+ack as above (``--publishers`` processes in ``Producer.batch()``,
round robin over the shards; ``--consumers`` processes each with one ``Consumer`` on
``hot``, which reads every shard), ``--messages`` (300,000; ``--quick`` 60,000) per
run, ``--rounds`` (2; ``--quick`` 1) of each. Per run: publish and consume rates, Redis
CPU per message (masters summed, replicas apart), each master's CPU and **the busiest
master's share of the masters' CPU** (100% when one master does all the work, 33% when
3 share it evenly), and the entries each master held after the publish (every stream of
the transport on it, found by ``SCAN``). Then one run with a master killed:
``--publishers`` processes publish one confirmed message at a time (retried through the
failover) and ``--consumers`` consume, for ``--kill-seconds`` (20; ``--quick`` 8; 0: no
such run); halfway, the master of shard 0 is killed (SIGKILL) and its replica takes
over. Every confirmed message must be consumed (lost: confirmed and never consumed;
duplicates: an ack lost with the master, its entry taken over again after the
``visibility_timeout`` of 5 s). With 3 masters on 2 cores, the spread of the server's
CPU over the masters is what to read; the msg/s are the Python clients' and the
scheduling of 10 processes.
"""
from __future__ import annotations

import argparse
import array
import multiprocessing
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

QUEUES_PER_MASTER = 4
MASTERS = 3
PREFETCH = 100
BATCH = 500
BODY = b'{"id": %d, "task": "bench.noop", "kwargs": {"flag": true}, "data": "' + b'x' * 230 + b'"}'
#: A consumer gives up when no message came for this long (a lost message).
IDLE_GIVE_UP = 30.0
CLK_TCK = os.sysconf('SC_CLK_TCK')
#: Below this share of one core, the busiest Redis process of the single setup
#: is called "not saturated".
SATURATED_PCT = 90.0


# -- measuring -------------------------------------------------------------------------------

def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of process ``pid`` so far."""
    with open('/proc/%d/stat' % pid) as stat:
        fields = stat.read().rpartition(')')[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of every core so far, from ``/proc/stat``."""
    with open('/proc/stat') as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)   # idle + iowait
    total = sum(values[:8])   # guest time is already in user
    return total - idle, total


def commands(port: int) -> dict:
    """Calls per command on the server at ``port`` so far."""
    with redis.Redis(port=port, socket_timeout=5) as client:
        stats = client.info('commandstats')
    return {name[len('cmdstat_'):]: value['calls'] for name, value in stats.items()}


@dataclass
class Setup:
    """One side of the comparison: a broker URL and the server processes behind it."""

    name: str
    url: str
    masters: list      # tests.servers.RedisServer
    replicas: list = field(default_factory=list)
    #: kombu ``transport_options`` of every client of this setup (``sharded_queues``...).
    options: dict = field(default_factory=dict)

    def snapshot(self) -> dict:
        return {'masters': [process_cpu(s.proc.pid) for s in self.masters],
                'replicas': [process_cpu(s.proc.pid) for s in self.replicas],
                'machine': machine_cpu(), 'at': time.monotonic()}

    def commands(self) -> dict:
        total: dict = {}
        for server in self.masters:
            for name, calls in commands(server.port).items():
                total[name] = total.get(name, 0) + calls
        return total

    def flush(self) -> None:
        for server in self.masters:
            with redis.Redis(port=server.port, socket_timeout=30) as client:
                client.flushall()


def server_work(setup: Setup, before: dict, after: dict, n: int) -> dict:
    wall = after['at'] - before['at']
    masters = [b - a for a, b in zip(before['masters'], after['masters'])]
    replicas = [b - a for a, b in zip(before['replicas'], after['replicas'])]
    busy = after['machine'][0] - before['machine'][0]
    total = after['machine'][1] - before['machine'][1]
    return {
        'masters_us': sum(masters) * 1e6 / n,
        'per_master_us': [m * 1e6 / n for m in masters],
        'replicas_us': sum(replicas) * 1e6 / n if setup.replicas else None,
        'busiest_pct': max(masters) / wall * 100,
        'machine_pct': busy / total * 100 if total else float('nan'),
    }


# -- the worker processes ----------------------------------------------------------------------

def queue_objects(names):
    from kombu import Queue
    return [Queue(name, routing_key=name) for name in names]


def publisher(index, url, names, first, count, options, barrier, results):
    """Publish ``count`` bodies numbered from ``first``, round-robin over ``names``."""
    try:
        from kombu import Connection, Producer

        import celery_streams  # noqa: F401  (registers the schemes)

        bodies = [BODY % i for i in range(first, first + count)]
        targets = [names[i % len(names)] for i in range(first, first + count)]
        with Connection(url, transport_options=options) as conn:
            producer = Producer(conn.default_channel)
            producer.publish(b'{}', routing_key='cb-warmup', content_type='application/json',
                             content_encoding='utf-8')   # connected, scripts and topology known
            barrier.wait(timeout=120)
            cpu0, began = time.process_time(), time.monotonic()
            with producer.batch(max_size=BATCH):
                for body, target in zip(bodies, targets):
                    producer.publish(body, routing_key=target, content_type='application/json',
                                     content_encoding='utf-8')
            ended = time.monotonic()
            cpu = time.process_time() - cpu0
        results.put(('publisher', index, {'began': began, 'ended': ended, 'cpu': cpu}))
    except BaseException:
        results.put(('error', index, 'publisher %d: %s' % (index, traceback.format_exc())))


def consumer(index, url, names, total, consumed, options, barrier, results):
    """Drain and ack ``names`` until ``total`` messages were consumed by all consumers."""
    try:
        from kombu import Connection, Consumer

        import celery_streams  # noqa: F401

        got = array.array('q')
        state = {'last': None, 'unreported': 0}

        def on_message(message):
            body = message.body
            if isinstance(body, str):
                body = body.encode()
            got.append(int(body[7:body.index(b',', 7)]))
            message.ack()
            state['last'] = time.monotonic()
            state['unreported'] += 1

        def report():
            if state['unreported']:
                with consumed.get_lock():
                    consumed.value += state['unreported']
                state['unreported'] = 0
            return consumed.value

        with Connection(url, transport_options=options) as conn:
            conn.connect()
            channel = conn.channel()
            barrier.wait(timeout=120)
            cpu0, began = time.process_time(), time.monotonic()
            quiet_since = began
            with Consumer(channel, queue_objects(names), on_message=on_message,
                          prefetch_count=PREFETCH, accept=['json']):
                while True:
                    try:
                        conn.drain_events(timeout=0.2)
                    except socket.timeout:
                        if report() >= total or time.monotonic() - quiet_since > IDLE_GIVE_UP:
                            break
                        continue
                    quiet_since = time.monotonic()
                    if state['unreported'] >= 500 and report() >= total:
                        break
                report()
            cpu = time.process_time() - cpu0
        results.put(('consumer', index, {'began': began, 'ended': state['last'], 'cpu': cpu,
                                         'ids': got.tobytes()}))
    except BaseException:
        results.put(('error', index, 'consumer %d: %s' % (index, traceback.format_exc())))


def run_processes(ctx, setup, target, argsets):
    """Start one process per argument tuple behind a barrier; measure the server around them.

    Returns (results by kind, server work snapshot before, after, errors)."""
    results = ctx.Queue()
    barrier = ctx.Barrier(len(argsets) + 1)
    procs = [ctx.Process(target=target, args=args + (barrier, results), daemon=True)
             for args in argsets]
    for proc in procs:
        proc.start()
    try:
        barrier.wait(timeout=180)
    except Exception:
        pass   # a worker failed before the barrier: its error is in the results
    before = setup.snapshot()
    collected, errors = [], []
    for _ in procs:
        kind, _index, value = results.get(timeout=900)
        (errors if kind == 'error' else collected).append(value)
        if kind == 'error':
            barrier.abort()
    after = setup.snapshot()
    for proc in procs:
        proc.join(30)
        if proc.is_alive():
            proc.terminate()
    return collected, before, after, errors


# -- one run ---------------------------------------------------------------------------------

def streams_by_master(setup) -> list:
    """``[(entries, pending)]`` per master, over every stream of the transport on it (the
    ``cb-warmup`` queue and dead letters left out): found by ``SCAN``, so the internal
    queues of a sharded queue count too, wherever their slots put them."""
    found = []
    for server in setup.masters:
        entries = pending = 0
        with redis.Redis(port=server.port, socket_timeout=5) as client:
            for key in client.scan_iter(match='*celery-streams:q:*', count=1000, _type='STREAM'):
                if b'{cb-warmup}' in key or key.endswith(b':dead'):
                    continue
                entries += client.xlen(key)
                pending += sum(group['pending'] for group in client.xinfo_groups(key))
        found.append((entries, pending))
    return found


def check_empty(setup, names) -> tuple[int, int]:
    """(entries left in the streams, entries pending) over every master (``names``: unused,
    every stream is looked at)."""
    found = streams_by_master(setup)
    return sum(e for e, _ in found), sum(p for _, p in found)


def write_shards(setup) -> None:
    """Write the setup's ``sharded_queues`` to the registry before anything is published (the
    transport writes it when a consumer starts, and the consumers start after the publish)."""
    wanted = setup.options.get('sharded_queues')
    if not wanted:
        return
    from redis.cluster import RedisCluster

    from celery_streams import shards
    from celery_streams.keys import Keys

    client = RedisCluster(host='127.0.0.1', port=setup.masters[0].port)
    try:
        shards.configure(client, Keys(setup.options.get('global_keyprefix', '')), wanted)
    finally:
        client.close()


def run_once(ctx, setup, names, args, log) -> dict:
    from kombu import Connection

    import celery_streams  # noqa: F401

    n, publishers, consumers = args.messages, args.publishers, args.consumers
    setup.flush()
    with Connection(setup.url, transport_options=setup.options) as conn:
        channel = conn.channel()
        for queue in queue_objects(names + ['cb-warmup']):
            queue(channel).declare()
    write_shards(setup)

    share = [n // publishers + (1 if i < n % publishers else 0) for i in range(publishers)]
    firsts = [sum(share[:i]) for i in range(publishers)]
    cmds0 = setup.commands()
    pubs, before, after, errors = run_processes(
        ctx, setup, publisher,
        [(i, setup.url, names, firsts[i], share[i], setup.options) for i in range(publishers)])
    if errors:
        raise RuntimeError('publishing failed:\n' + '\n'.join(errors))
    cmds1 = setup.commands()
    held = [entries for entries, _ in streams_by_master(setup)]
    publish_wall = max(p['ended'] for p in pubs) - min(p['began'] for p in pubs)
    result = {'publish_rate': n / publish_wall,
              'publish_client_us': sum(p['cpu'] for p in pubs) * 1e6 / n,
              'publish': server_work(setup, before, after, n),
              'held_per_master': held}

    consumed = ctx.Value('q', 0)
    cons, before, after, errors = run_processes(
        ctx, setup, consumer, [(i, setup.url, names, n, consumed, setup.options) for i in range(consumers)])
    if errors:
        raise RuntimeError('consuming failed:\n' + '\n'.join(errors))
    cmds2 = setup.commands()
    ends = [c['ended'] for c in cons if c['ended'] is not None]
    consume_wall = (max(ends) if ends else after['at']) - min(c['began'] for c in cons)
    counts = bytearray(n)
    received = duplicates = strays = 0
    for c in cons:
        ids = array.array('q')
        ids.frombytes(c['ids'])
        received += len(ids)
        for i in ids:
            if 0 <= i < n:
                if counts[i]:
                    duplicates += 1
                counts[i] = min(counts[i] + 1, 255)
            else:
                strays += 1
    missing = counts.count(0)
    left, pending = check_empty(setup, names)
    result.update({
        'consume_rate': received / consume_wall,
        'consume_client_us': sum(c['cpu'] for c in cons) * 1e6 / n,
        'consume': server_work(setup, before, after, n),
        'per_consumer': [len(c['ids']) // 8 for c in cons],
        'check': {'received': received, 'missing': missing, 'duplicates': duplicates,
                  'strays': strays, 'left': left, 'pending': pending},
        'cmds_publish': per_message(cmds0, cmds1, n),
        'cmds_consume': per_message(cmds1, cmds2, n),
    })
    if missing or duplicates or strays or received != n or left or pending:
        log('!!!!! WARNING: %s: NOT exactly once: %d received of %d, %d missing, %d duplicates, '
            '%d strays; %d entries left in the streams, %d pending !!!!!'
            % (setup.name, received, n, missing, duplicates, strays, left, pending))
    return result


def per_message(before, after, n) -> dict:
    per = {cmd: (calls - before.get(cmd, 0)) / n for cmd, calls in after.items()}
    return {cmd: v for cmd, v in sorted(per.items(), key=lambda kv: -kv[1])
            if v >= 0.01 and cmd not in ('info', 'ping', 'flushall')}


# -- setup, names, report ------------------------------------------------------------------------

def spread_names(cluster, primaries) -> list:
    """12 queue names, 4 on each master: the slot of ``celery-streams:q:{name}`` decides."""
    from redis.crc import key_slot

    client = cluster.client()
    try:
        wanted = {s.port: QUEUES_PER_MASTER for s in primaries}
        names, i = [], 0
        while any(wanted.values()):
            name = 'cb%d' % i
            key = 'celery-streams:q:{%s}' % name
            port = client.get_node_from_key(key).port
            if wanted.get(port):
                wanted[port] -= 1
                names.append((port, key_slot(key.encode()), name))
            i += 1
    finally:
        client.close()
    return names


def spread(values):
    if not values:
        return 'n/a'
    med = statistics.median(values)
    digits = 0 if med >= 100 else 1
    number = '{:,.%df}' % digits
    if len(values) == 1:
        return number.format(med)
    return '%s (%s–%s)' % (number.format(med), number.format(min(values)), number.format(max(values)))


def ratio(single, cluster):
    if not single or not cluster:
        return 'n/a'
    return '%.2f' % (statistics.median(cluster) / statistics.median(single))


def report(runs, log):
    rows = [
        ('publish msg/s', lambda r: r['publish_rate']),
        ('consume+ack msg/s', lambda r: r['consume_rate']),
        ('Redis CPU µs/msg, publish (masters)', lambda r: r['publish']['masters_us']),
        ('Redis CPU µs/msg, consume+ack (masters)', lambda r: r['consume']['masters_us']),
        ('Redis CPU µs/msg, publish (replicas)', lambda r: r['publish']['replicas_us']),
        ('Redis CPU µs/msg, consume+ack (replicas)', lambda r: r['consume']['replicas_us']),
        ('busiest Redis process, % of a core, publish', lambda r: r['publish']['busiest_pct']),
        ('busiest Redis process, % of a core, consume+ack', lambda r: r['consume']['busiest_pct']),
        ('client CPU µs/msg, publish (all publishers)', lambda r: r['publish_client_us']),
        ('client CPU µs/msg, consume+ack (all consumers)', lambda r: r['consume_client_us']),
        ('machine CPU busy %, publish', lambda r: r['publish']['machine_pct']),
        ('machine CPU busy %, consume+ack', lambda r: r['consume']['machine_pct']),
    ]
    log('| metric | single: median (min–max) | cluster: median (min–max) | cluster / single |')
    log('|---|---|---|---|')
    for label, get in rows:
        single = [v for v in (get(r) for r in runs['single']) if v is not None]
        cluster = [v for v in (get(r) for r in runs['cluster']) if v is not None]
        log('| %s | %s | %s | %s |' % (label, spread(single) if single else '–', spread(cluster),
                                       ratio(single, cluster) if single else '–'))


def machine_facts(server_version, load_at_start, digest, args, queues='12 queues') -> list:
    import kombu

    cpu = '?'
    with open('/proc/cpuinfo') as info:
        for line in info:
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    try:
        commit = subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=ROOT,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:
        commit = '?'
    return [
        'cores (nproc): %d (%s)' % (os.cpu_count(), cpu),
        'server: %s, no persistence; Python %s, kombu %s, redis-py %s, celery_streams git %s, '
        'sources sha256 %s' % (server_version, platform.python_version(), kombu.__version__,
                               redis.__version__, commit, digest),
        'uptime at start: %s' % load_at_start,
        'workload: %d messages per run (%d publishers, batch %d; %d consumers, prefetch %d), '
        '%s, %d rounds' % (args.messages, args.publishers, BATCH, args.consumers, PREFETCH,
                           queues, args.rounds),
    ]


def uptime() -> str:
    try:
        return subprocess.run(['uptime'], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:
        return 'load average %.2f, %.2f, %.2f' % os.getloadavg()


def parse(argv):
    parser = argparse.ArgumentParser(prog='python -m benchmarks cluster',
                                     description=__doc__.split('\n')[0])
    parser.add_argument('--rounds', type=int, default=None,
                        help='runs of each setup, alternating (default 3; --hot-shards: 2, --quick: 1)')
    parser.add_argument('--messages', type=int, default=None,
                        help='messages per run (default 600,000; --hot-shards: 300,000; --quick: 60,000)')
    parser.add_argument('--publishers', type=int, default=2, help='publishing processes')
    parser.add_argument('--consumers', type=int, default=2, help='consuming processes')
    parser.add_argument('--hot-shards', type=int, default=None, metavar='N',
                        help='one hot queue: N shards (sharded_queues) against 1 stream, then a run '
                             'with a master killed (see the module docstring)')
    parser.add_argument('--kill-seconds', type=float, default=None,
                        help='--hot-shards: length of the publishing of the run with a master killed '
                             'halfway (default 20; --quick: 8; 0: no such run)')
    parser.add_argument('--quick', action='store_true', help='small sizes: under 2 minutes')
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2 if args.hot_shards else 3
    if args.messages is None:
        args.messages = 60_000 if args.quick else 300_000 if args.hot_shards else 600_000
    if args.kill_seconds is None:
        args.kill_seconds = 8.0 if args.quick else 20.0
    if args.hot_shards is not None and args.hot_shards < 2:
        parser.error('--hot-shards: 2 or more (it is measured against 1)')
    return args


def main(argv=None):
    args = parse(argv)
    if args.hot_shards:
        return main_hot(args)
    from tests.servers import ClusterTopology, RedisServer, find_server

    started, load_at_start = time.monotonic(), uptime()
    # Imported once, here, before any worker process forks: a run measures the sources as they
    # were at its start (the digest names them), even while someone edits the work tree.
    import celery_streams  # noqa: F401

    from .common import sources_digest
    digest = sources_digest(ROOT)

    def log(text=''):
        print(text, flush=True)

    def progress(text):
        print('[%4.0fs] %s' % (time.monotonic() - started, text), flush=True)

    # fork: the children run a function of this module; spawn would re-run ``python -m benchmarks``.
    ctx = multiprocessing.get_context('fork')
    binary = find_server()
    log('# Redis Cluster (3 masters + 3 replicas) vs one Redis server')
    log()
    topology = ClusterTopology(binary=binary.path, masters=MASTERS)
    single = RedisServer(binary=binary.path, name='bench-single')
    runs = {'single': [], 'cluster': []}
    failures = 0
    try:
        topology.start()
        single.start()
        primaries = topology.primaries()
        replicas = [s for s in topology.servers if s not in primaries]
        placed = spread_names(topology, primaries)
        names = [name for _, _, name in placed]
        for fact in machine_facts('%s %s (%s)' % (single.flavor, single.version, binary.path),
                                  load_at_start, digest, args):
            log('- ' + fact)
        log('- queues: ' + ', '.join('%s (slot %d, :%d)' % (name, slot, port) for port, slot, name in placed))
        log()
        setups = [Setup('single', 'redis-streams://127.0.0.1:%d/0' % single.port, [single]),
                  Setup('cluster', topology.urls(), primaries, replicas)]
        for r in range(args.rounds):
            for setup in setups:
                try:
                    result = run_once(ctx, setup, names, args, progress)
                except Exception as exc:
                    failures += 1
                    progress('%-7s round %d FAILED: %s' % (setup.name, r + 1, exc))
                    continue
                runs[setup.name].append(result)
                check = result['check']
                progress('%-7s round %d: publish %.0f msg/s, consume+ack %.0f msg/s; Redis µs/msg '
                         'pub %s / cons %s (per master), replicas %s / %s; busiest Redis %.0f%% / '
                         '%.0f%%; machine %.0f%% / %.0f%%; per consumer %s; %s'
                         % (setup.name, r + 1, result['publish_rate'], result['consume_rate'],
                            '+'.join('%.1f' % v for v in result['publish']['per_master_us']),
                            '+'.join('%.1f' % v for v in result['consume']['per_master_us']),
                            _num(result['publish']['replicas_us']),
                            _num(result['consume']['replicas_us']),
                            result['publish']['busiest_pct'], result['consume']['busiest_pct'],
                            result['publish']['machine_pct'], result['consume']['machine_pct'],
                            result['per_consumer'],
                            'exactly once' if check['received'] == args.messages and not (
                                check['missing'] or check['duplicates'] or check['left']
                                or check['pending']) else 'CHECK FAILED %s' % check))
                if r == 0:
                    progress('%-7s commands/msg, publish: %s; consume+ack: %s'
                             % (setup.name, _cmds(result['cmds_publish']), _cmds(result['cmds_consume'])))
    finally:
        single.close()
        topology.stop()
    log()
    report(runs, log)
    log()
    log('- uptime at end: %s; %.0f s in all' % (uptime(), time.monotonic() - started))
    log('- the masters\' CPU includes feeding their replicas (the replication stream); the single '
        'server has no replica')
    if runs['single']:
        busiest = max(max(r['publish']['busiest_pct'], r['consume']['busiest_pct'])
                      for r in runs['single'])
        if busiest < SATURATED_PCT:
            log('- NOTE: the single Redis was NOT saturated (at most %.0f%% of a core in any phase): '
                'on %d cores the Python clients are the bottleneck, so the msg/s ratio measures the '
                'clients and the scheduling of %d processes, not what 3 masters can take; the CPU '
                'µs/msg rows are the server-side comparison.'
                % (busiest, os.cpu_count(), max(args.publishers, args.consumers)))
    bad = [r for setup in runs.values() for r in setup
           if r['check']['missing'] or r['check']['duplicates'] or r['check']['left']
           or r['check']['pending'] or r['check']['received'] != args.messages]
    if bad or failures:
        log('- !!!!! WARNING: %d run(s) not exactly once, %d run(s) failed: see above !!!!!'
            % (len(bad), failures))
        return 1
    log('- every run: each message consumed exactly once, streams empty, nothing pending')
    return 0


def _num(value):
    return '–' if value is None else '%.1f' % value


def _cmds(per):
    return ', '.join('%s %.2f' % kv for kv in list(per.items())[:8]) or '–'


# -- one hot queue, sharded (issue #25) ------------------------------------------------------

#: The hot queue of ``--hot-shards``.
HOT = 'hot'
#: The publish retry policy of the run with a master killed: ~10 s, longer than a failover.
RETRY = {'max_retries': 40, 'interval_start': 0, 'interval_step': 0.1, 'interval_max': 0.25}
#: ``visibility_timeout`` of that run: what a consumer held when its connection broke comes back soon.
KILL_VT = 5.0


def hot_setups(topology, shards) -> list:
    """The two setups of ``--hot-shards``: the hot queue as one stream, and as ``shards``."""
    primaries = topology.primaries()
    replicas = [s for s in topology.servers if s not in primaries]
    return [Setup('1 stream', topology.urls(), primaries, replicas),
            Setup('%d shards' % shards, topology.urls(), primaries, replicas,
                  options={'sharded_queues': {HOT: shards}})]


def busiest_share(work) -> float:
    """The busiest master's share of the masters' CPU (1/3: evenly spread over 3)."""
    total = sum(work['per_master_us'])
    return max(work['per_master_us']) / total if total else float('nan')


def steady_publisher(index, stride, url, options, stop, results):
    """Publish one message at a time (confirmed: ``publish_confirm='now'``), retrying through a
    failover, until ``stop``; numbers ``index``, ``index + stride``... Reports the numbers whose
    publish returned and how many raised."""
    try:
        from kombu import Connection, Producer

        import celery_streams  # noqa: F401

        confirmed, failed, i = array.array('q'), 0, index
        with Connection(url, transport_options=options) as conn:
            producer = Producer(conn)
            while not stop.is_set():
                try:
                    producer.publish(BODY % i, routing_key=HOT, content_type='application/json',
                                     content_encoding='utf-8', retry=True, retry_policy=RETRY)
                except Exception:
                    failed += 1
                else:
                    confirmed.append(i)
                i += stride
        results.put(('publisher', index, {'ids': confirmed.tobytes(), 'failed': failed}))
    except BaseException:
        results.put(('error', index, 'publisher %d: %s' % (index, traceback.format_exc())))


def steady_consumer(index, url, options, consumed, done, results):
    """Consume and ack the hot queue until ``done`` and quiet for a second; a connection lost
    (the master killed) is opened again. Reports the numbers consumed and the reconnections."""
    try:
        from kombu import Connection, Consumer

        import celery_streams  # noqa: F401

        got = array.array('q')
        state = {'quiet_since': time.monotonic()}
        reconnects, causes = 0, []

        def on_message(message):
            body = message.body
            if isinstance(body, str):
                body = body.encode()
            got.append(int(body[7:body.index(b',', 7)]))
            message.ack()
            with consumed.get_lock():
                consumed.value += 1
            state['quiet_since'] = time.monotonic()

        while True:
            try:
                with Connection(url, transport_options=options) as conn:
                    conn.ensure_connection(**RETRY)
                    with Consumer(conn.channel(), queue_objects([HOT]), on_message=on_message,
                                  prefetch_count=PREFETCH, accept=['json']):
                        while not (done.is_set() and time.monotonic() - state['quiet_since'] > 1.0):
                            try:
                                conn.drain_events(timeout=0.2)
                            except socket.timeout:
                                pass
                break
            except Exception as exc:
                reconnects += 1
                causes.append('%s: %s' % (type(exc).__name__, str(exc).splitlines()[0][:120]
                                          if str(exc) else ''))
                if reconnects > 100:
                    raise
                time.sleep(0.2)
        results.put(('consumer', index, {'ids': got.tobytes(), 'reconnects': reconnects,
                                         'causes': causes[:5]}))
    except BaseException:
        results.put(('error', index, 'consumer %d: %s' % (index, traceback.format_exc())))


def run_kill(ctx, topology, shards, args, log) -> dict:
    """The hot queue in ``shards`` shards: publishers and consumers run together for
    ``--kill-seconds``; halfway, the master of shard 0 is killed (SIGKILL) and its replica
    takes over. Then every confirmed message must be consumed."""
    from kombu import Connection

    setup = hot_setups(topology, shards)[1]
    setup.flush()
    options = {**setup.options, 'visibility_timeout': KILL_VT}
    with Connection(setup.url, transport_options=options) as conn:
        queue_objects([HOT])[0](conn.channel()).declare()
    write_shards(setup)
    victim = topology.master_for('celery-streams:q:{%s}' % HOT)
    stop, done, consumed = ctx.Event(), ctx.Event(), ctx.Value('q', 0)
    pub_results, con_results = ctx.Queue(), ctx.Queue()
    consumers = [ctx.Process(target=steady_consumer, args=(i, setup.url, options, consumed, done,
                                                           con_results), daemon=True)
                 for i in range(args.consumers)]
    publishers = [ctx.Process(target=steady_publisher, args=(i, args.publishers, setup.url, options,
                                                             stop, pub_results), daemon=True)
                  for i in range(args.publishers)]
    for proc in consumers + publishers:
        proc.start()
    began = time.monotonic()
    time.sleep(args.kill_seconds / 2)
    killed_at = time.monotonic()
    promoted = topology.kill(victim)
    failover = time.monotonic() - killed_at
    log('killed %s :%d at %.1f s; %s :%d took over in %.1f s'
        % (victim.name, victim.port, killed_at - began, promoted.name, promoted.port, failover))
    time.sleep(max(0.0, began + args.kill_seconds - time.monotonic()))
    stop.set()
    published, errors = [], []
    for _ in publishers:
        kind, _index, value = pub_results.get(timeout=120)
        (errors if kind == 'error' else published).append(value)
    publish_wall = time.monotonic() - began
    confirmed = array.array('q')
    for p in published:
        confirmed.frombytes(p['ids'])
    # Every confirmed message consumed (or nothing more for 60 s: something is missing).
    deadline, last, last_change = time.monotonic() + 120, -1, time.monotonic()
    while time.monotonic() < deadline:
        now = consumed.value
        if now != last:
            last, last_change = now, time.monotonic()
        if now >= len(confirmed) and time.monotonic() - last_change > 2.0:
            break
        if time.monotonic() - last_change > 60:
            break
        time.sleep(0.2)
    # An ack lost with the killed master leaves its entry pending on the promoted replica: it is
    # taken over once the visibility timeout passed, and delivered again (a duplicate).
    setup.masters = topology.primaries()
    deadline = time.monotonic() + 3 * KILL_VT + 5
    while check_empty(setup, [HOT]) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.5)
    done.set()
    taken = []
    for _ in consumers:
        kind, _index, value = con_results.get(timeout=120)
        (errors if kind == 'error' else taken).append(value)
    for proc in consumers + publishers:
        proc.join(30)
        if proc.is_alive():
            proc.terminate()
    counts: dict = {}
    for c in taken:
        ids = array.array('q')
        ids.frombytes(c['ids'])
        for i in ids:
            counts[i] = counts.get(i, 0) + 1
    wanted = set(confirmed)
    left, pending = check_empty(setup, [HOT])
    held = pending_detail(setup) if pending else []
    return {
        'published': len(confirmed), 'failed': sum(p['failed'] for p in published),
        'publish_rate': len(confirmed) / publish_wall,
        'consumed': sum(counts.values()),
        'lost': len(wanted - set(counts)),
        'duplicates': sum(n - 1 for n in counts.values() if n > 1),
        'unconfirmed_consumed': len(set(counts) - wanted),
        'reconnects': sum(c['reconnects'] for c in taken),
        'causes': sorted({cause for c in taken for cause in c['causes']}),
        'failover_s': failover, 'victim': victim.port, 'promoted': promoted.port,
        'left': left, 'pending': pending, 'held': held, 'errors': errors,
    }


def pending_detail(setup) -> list:
    """What is still pending, where: ``(port, stream, consumer, entries, idle ms of the
    oldest)``, and the liveness keys of those consumers (their TTL in ms)."""
    found = []
    for server in setup.masters:
        with redis.Redis(port=server.port, socket_timeout=5, decode_responses=True) as client:
            for key in client.scan_iter(match='*celery-streams:q:*', count=1000, _type='STREAM'):
                summary = client.xpending(key, 'celery') if client.xinfo_groups(key) else None
                if not summary or not summary['pending']:
                    continue
                oldest = client.xpending_range(key, 'celery', '-', '+', 1)
                for consumer in summary['consumers']:
                    found.append((server.port, key, consumer['name'], consumer['pending'],
                                  oldest[0]['time_since_delivered'] if oldest else None))
            for key in client.scan_iter(match='*celery-streams:q:*:alive:*', count=1000):
                found.append((server.port, key, 'alive key', client.pttl(key), None))
    return found


def main_hot(args) -> int:
    """``--hot-shards N``: the hot queue as 1 stream and as N shards, in turns; then the kill run."""
    from tests.servers import ClusterTopology, find_server

    started, load_at_start = time.monotonic(), uptime()
    import celery_streams  # noqa: F401

    from .common import sources_digest
    digest = sources_digest(ROOT)

    def log(text=''):
        print(text, flush=True)

    def progress(text):
        print('[%4.0fs] %s' % (time.monotonic() - started, text), flush=True)

    ctx = multiprocessing.get_context('fork')
    binary = find_server()
    shards = args.hot_shards
    log('# One hot queue on a Redis Cluster (3 masters + 3 replicas): %d shards vs 1 stream' % shards)
    log()
    topology = ClusterTopology(binary=binary.path, masters=MASTERS)
    runs: dict = {}
    failures, killed = 0, None
    try:
        topology.start()
        primaries = topology.primaries()
        for fact in machine_facts('%s %s (%s)' % (primaries[0].flavor, primaries[0].version,
                                                  binary.path),
                                  load_at_start, digest, args, queues='one queue %r' % HOT):
            log('- ' + fact)
        log('- masters: ' + ', '.join(':%d' % s.port for s in primaries)
            + '; queue %r (shard 0) on :%d' % (HOT, topology.master_for('celery-streams:q:{%s}' % HOT).port))
        log()
        setups = hot_setups(topology, shards)
        runs = {setup.name: [] for setup in setups}
        for r in range(args.rounds):
            for setup in setups:
                try:
                    result = run_once(ctx, setup, [HOT], args, progress)
                except Exception as exc:
                    failures += 1
                    progress('%-9s round %d FAILED: %s' % (setup.name, r + 1, exc))
                    continue
                runs[setup.name].append(result)
                check = result['check']
                progress('%-9s round %d: publish %.0f msg/s, consume+ack %.0f msg/s; entries per master '
                         'after publish %s; Redis µs/msg pub %s / cons %s (per master); busiest '
                         'master\'s share %.0f%% / %.0f%%; machine %.0f%% / %.0f%%; %s'
                         % (setup.name, r + 1, result['publish_rate'], result['consume_rate'],
                            '+'.join(str(v) for v in result['held_per_master']),
                            '+'.join('%.1f' % v for v in result['publish']['per_master_us']),
                            '+'.join('%.1f' % v for v in result['consume']['per_master_us']),
                            busiest_share(result['publish']) * 100,
                            busiest_share(result['consume']) * 100,
                            result['publish']['machine_pct'], result['consume']['machine_pct'],
                            'exactly once' if check['received'] == args.messages and not (
                                check['missing'] or check['duplicates'] or check['left']
                                or check['pending']) else 'CHECK FAILED %s' % check))
                if r == 0:
                    progress('%-9s commands/msg, publish: %s; consume+ack: %s'
                             % (setup.name, _cmds(result['cmds_publish']), _cmds(result['cmds_consume'])))
        if args.kill_seconds > 0:
            try:
                killed = run_kill(ctx, topology, shards, args, progress)
            except Exception:
                failures += 1
                progress('kill run FAILED: %s' % traceback.format_exc())
    finally:
        topology.stop()
    log()
    report_hot(runs, setups, log)
    if killed is not None:
        log()
        log('A master killed halfway through %.0f s of publishing (%d publishers, one confirmed publish '
            'at a time, retried through the failover; %d consumers, visibility_timeout %.0f s):'
            % (args.kill_seconds, args.publishers, args.consumers, KILL_VT))
        log()
        log('| published (confirmed) | publishes that raised | consumed | lost | duplicates | '
            'consumed, publish not confirmed | consumer reconnections | failover | publish msg/s |')
        log('|---|---|---|---|---|---|---|---|---|')
        log('| %d | %d | %d | **%d** | %d | %d | %d | %.1f s | %.0f |'
            % (killed['published'], killed['failed'], killed['consumed'], killed['lost'],
               killed['duplicates'], killed['unconfirmed_consumed'], killed['reconnects'],
               killed['failover_s'], killed['publish_rate']))
        if killed['causes']:
            log('- consumer reconnections after: ' + '; '.join(killed['causes']))
        if killed['errors']:
            log('- errors: ' + '\n'.join(killed['errors']))
        log('- left in the streams afterwards: %d entries, %d pending' % (killed['left'], killed['pending']))
        for port, key, consumer, entries, idle in killed['held']:
            log('  - :%d %s %s: %s pending%s' % (port, key, consumer, entries,
                                                 '' if idle is None else ', oldest idle %d ms' % idle))
    log()
    log('- uptime at end: %s; %.0f s in all' % (uptime(), time.monotonic() - started))
    log('- %d cores for 6 Redis processes and %d client processes: read the spread of the masters\' '
        'CPU (the busiest master\'s share), not the msg/s'
        % (os.cpu_count(), args.publishers + args.consumers))
    bad = [r for setup in runs.values() for r in setup
           if r['check']['missing'] or r['check']['duplicates'] or r['check']['left']
           or r['check']['pending'] or r['check']['received'] != args.messages]
    if killed is not None and (killed['lost'] or killed['errors']):
        bad.append(killed)
    if killed is not None and killed['pending']:
        log('- NOTE: %d entries still pending after the run with a master killed (acked, the ack '
            'lost with the master, not taken over yet): listed above' % killed['pending'])
    if bad or failures:
        log('- !!!!! WARNING: %d run(s) lost or duplicated messages, %d run(s) failed: see above !!!!!'
            % (len(bad), failures))
        return 1
    log('- every measured run: each message consumed exactly once, streams empty, nothing pending')
    return 0


def report_hot(runs, setups, log):
    first, second = setups[0].name, setups[1].name
    rows = [
        ('publish msg/s', lambda r: r['publish_rate']),
        ('consume+ack msg/s', lambda r: r['consume_rate']),
        ('Redis CPU µs/msg, publish (masters)', lambda r: r['publish']['masters_us']),
        ('Redis CPU µs/msg, consume+ack (masters)', lambda r: r['consume']['masters_us']),
        ('Redis CPU µs/msg, publish (replicas)', lambda r: r['publish']['replicas_us']),
        ('Redis CPU µs/msg, consume+ack (replicas)', lambda r: r['consume']['replicas_us']),
        ("busiest master's share of the masters' CPU, publish %",
         lambda r: busiest_share(r['publish']) * 100),
        ("busiest master's share of the masters' CPU, consume+ack %",
         lambda r: busiest_share(r['consume']) * 100),
        ('busiest master, % of a core, publish', lambda r: r['publish']['busiest_pct']),
        ('busiest master, % of a core, consume+ack', lambda r: r['consume']['busiest_pct']),
        ("busiest master's share of the entries after publish %",
         lambda r: max(r['held_per_master']) * 100 / max(1, sum(r['held_per_master']))),
        ('client CPU µs/msg, publish (all publishers)', lambda r: r['publish_client_us']),
        ('client CPU µs/msg, consume+ack (all consumers)', lambda r: r['consume_client_us']),
        ('machine CPU busy %, publish', lambda r: r['publish']['machine_pct']),
        ('machine CPU busy %, consume+ack', lambda r: r['consume']['machine_pct']),
    ]
    log('| metric | %s: median (min–max) | %s: median (min–max) | %s / %s |'
        % (first, second, second, first))
    log('|---|---|---|---|')
    for label, get in rows:
        a = [v for v in (get(r) for r in runs.get(first, [])) if v is not None]
        b = [v for v in (get(r) for r in runs.get(second, [])) if v is not None]
        log('| %s | %s | %s | %s |' % (label, spread(a) if a else '–', spread(b) if b else '–',
                                       ratio(a, b) if a and b else '–'))
