"""``python -m benchmarks cluster [--rounds 3] [--messages N]``: many queues on 3 masters vs one Redis.

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


def publisher(index, url, names, first, count, barrier, results):
    """Publish ``count`` bodies numbered from ``first``, round-robin over ``names``."""
    try:
        from kombu import Connection, Producer

        import celery_streams  # noqa: F401  (registers the schemes)

        bodies = [BODY % i for i in range(first, first + count)]
        targets = [names[i % len(names)] for i in range(first, first + count)]
        with Connection(url) as conn:
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


def consumer(index, url, names, total, consumed, barrier, results):
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

        with Connection(url) as conn:
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

def check_empty(setup, names) -> tuple[int, int]:
    """(entries left in the streams, entries pending) over ``names``."""
    left = pending = 0
    for name in names:
        key = 'celery-streams:q:{%s}' % name
        for server in setup.masters:
            with redis.Redis(port=server.port, socket_timeout=5) as client:
                try:
                    if not client.exists(key):
                        continue
                    left += client.xlen(key)
                    for group in client.xinfo_groups(key):
                        pending += group['pending']
                except redis.ResponseError:   # MOVED: the key lives on another master
                    continue
    return left, pending


def run_once(ctx, setup, names, args, log) -> dict:
    from kombu import Connection

    import celery_streams  # noqa: F401

    n, publishers, consumers = args.messages, args.publishers, args.consumers
    setup.flush()
    with Connection(setup.url) as conn:
        channel = conn.channel()
        for queue in queue_objects(names + ['cb-warmup']):
            queue(channel).declare()

    share = [n // publishers + (1 if i < n % publishers else 0) for i in range(publishers)]
    firsts = [sum(share[:i]) for i in range(publishers)]
    cmds0 = setup.commands()
    pubs, before, after, errors = run_processes(
        ctx, setup, publisher, [(i, setup.url, names, firsts[i], share[i]) for i in range(publishers)])
    if errors:
        raise RuntimeError('publishing failed:\n' + '\n'.join(errors))
    cmds1 = setup.commands()
    publish_wall = max(p['ended'] for p in pubs) - min(p['began'] for p in pubs)
    result = {'publish_rate': n / publish_wall,
              'publish_client_us': sum(p['cpu'] for p in pubs) * 1e6 / n,
              'publish': server_work(setup, before, after, n)}

    consumed = ctx.Value('q', 0)
    cons, before, after, errors = run_processes(
        ctx, setup, consumer, [(i, setup.url, names, n, consumed) for i in range(consumers)])
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


def machine_facts(server_version, load_at_start, digest, args) -> list:
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
        '12 queues, %d rounds' % (args.messages, args.publishers, BATCH, args.consumers, PREFETCH,
                                   args.rounds),
    ]


def uptime() -> str:
    try:
        return subprocess.run(['uptime'], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:
        return 'load average %.2f, %.2f, %.2f' % os.getloadavg()


def parse(argv):
    parser = argparse.ArgumentParser(prog='python -m benchmarks cluster',
                                     description=__doc__.split('\n')[0])
    parser.add_argument('--rounds', type=int, default=3, help='runs of each setup, alternating')
    parser.add_argument('--messages', type=int, default=600_000, help='messages per run')
    parser.add_argument('--publishers', type=int, default=2, help='publishing processes')
    parser.add_argument('--consumers', type=int, default=2, help='consuming processes')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
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
