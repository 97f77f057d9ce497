"""``python -m benchmarks server-cost``: where the Redis server's time goes per Celery task.

Issue #25, the measuring part. On a fresh private ``redis-server`` per run (never
the shared one on 6379), N no-op Celery tasks (default 20,000; ``--quick``
5,000) are published (``send_task`` inside ``Producer.batch()``, or one by one
with ``--publish one``) and one ``celery worker -P prefork -c 2`` consumes them,
with acks early and with ``task_acks_late=True``, for celery_streams
(``redis-streams://``) and kombu's Redis transport (``redis://``) side by side.
The worker starts on an idle queue first and is told to consume the tasks with
``add_consumer`` once they are all queued, then to stop consuming the idle queue
(``cancel_consumer``), so that it reads the tasks' queue alone, as a default worker
reads ``celery`` alone (``--also-idle``: it keeps both, as the figures measured
before 2026-12-08 did); default transport options.

Two passes per configuration:

* **measured pass** (``--rounds``, alternating): ``INFO commandstats`` and
  ``INFO cpu`` (``used_cpu_sys + used_cpu_user``) before the publish, after it
  and after the last task, nothing else changed on the server. This gives the
  Redis CPU per task and, per command, calls and ``usec`` per task;
* **attribution pass** (``--trace-tasks``, default 5,000 tasks): the same run
  with ``slowlog-log-slower-than 0``, so that every command is logged with its
  arguments and duration. It tells which script each ``EVALSHA`` ran (by SHA),
  which commands ran inside a script (logged by the Lua client just before
  their script) or inside a ``MULTI``/``EXEC`` (logged right after the
  client's ``MULTI``; ``EXEC`` itself is not logged), and what each command is
  for (by its key: the task's own counters, liveness keys, ledgers, Celery's
  pidbox...). Its fractions split the measured pass' commandstats figures;
  its own CPU figures (inflated by the slow log) are not used.

No double counting: commandstats counts a command run by a script (or by
``EXEC``) under its own name *and* inside the script's ``EVALSHA`` time. The
tables list top-level commands (their µs add up to the server's command time)
and show the commands a script or ``EXEC`` ran indented under it, marked
"inside", with "(script itself)" for the rest of its time; the summary by
purpose uses the leaves (top-level commands, commands inside, the script's own
remainder), which add up to the same total. "outside commands" is the CPU
that no command accounts for: socket reads and writes, protocol parsing, the
event loop, ``serverCron``.

Also: a capacity table (tasks per second one Redis core serves,
1e6 / CPU µs per task) and a scaling run: 1, 2 and 4 workers (``-c 2`` each,
``polling_interval`` 0.1 so that they join together) drain the same backlog;
Redis CPU seconds / wall seconds while they consume, and tasks/s.

``--code DIR`` measures the ``celery_streams`` package of another checkout (a
``git worktree`` of another commit) with these benchmarks, so that a change
is measured before and after.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

from . import common
from .common import KOMBU_REDIS, STREAMS, wait_until

#: Commands of this benchmark itself (snapshots, slow log), never counted.
OWN = frozenset(('info', 'slowlog', 'config', 'flushall'))
SCRIPT_CALLS = frozenset(('evalsha', 'eval', 'evalsha_ro', 'eval_ro', 'fcall', 'fcall_ro'))
BLOCKING = frozenset(('brpop', 'blpop', 'bzpopmin', 'bzpopmax', 'blmove', 'brpoplpush'))
ACKS = ((False, 'acks early'), (True, 'acks_late'))
INSIDE = '    ↳ '
#: The parent of the commands run inside a transaction (EXEC is not in the slow log).
EXEC_PARENT = 'EXEC @ transactions (MULTI/EXEC)'


def parse(argv):
    parser = argparse.ArgumentParser(prog='python -m benchmarks server-cost',
                                     description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='5,000 tasks (default 20,000)')
    parser.add_argument('--tasks', type=int, help='tasks per run (default 20,000; quick 5,000)')
    parser.add_argument('--trace-tasks', type=int, help='tasks of the attribution pass '
                        '(default min(tasks, 5,000)); 0: no attribution pass')
    parser.add_argument('--rounds', type=int, default=1, help='measured passes per configuration')
    parser.add_argument('--publish', choices=('batch', 'one'), default='batch',
                        help="send_task inside Producer.batch() (default), or one by one")
    parser.add_argument('--workers', default='1,2,4', help="worker counts of the scaling run "
                        "('' to skip it)")
    parser.add_argument('--scaling-tasks', type=int, help='tasks of each scaling run (default: --tasks)')
    parser.add_argument('--no-cost', action='store_true', help='only the scaling run')
    parser.add_argument('--transports', default='%s,%s' % (STREAMS, KOMBU_REDIS),
                        help='comma-separated, among: %s, %s' % (STREAMS, KOMBU_REDIS))
    parser.add_argument('--also-idle', action='store_true',
                        help="the worker keeps consuming its idle queue next to the tasks' queue")
    parser.add_argument('--code', help='measure the celery_streams package of this checkout')
    parser.add_argument('--output', type=Path, help='also write the markdown report here')
    args = parser.parse_args(argv)
    args.tasks = args.tasks or (5_000 if args.quick else 20_000)
    if args.trace_tasks is None:
        args.trace_tasks = min(args.tasks, 5_000)
    args.scaling_tasks = args.scaling_tasks or args.tasks
    args.workers = [int(w) for w in args.workers.split(',') if w.strip()]
    args.transports = [t.strip() for t in args.transports.split(',') if t.strip()]
    unknown = set(args.transports) - {STREAMS, KOMBU_REDIS}
    if unknown:
        parser.error('unknown transport(s): %s' % ', '.join(sorted(unknown)))
    return args


def prepare_code(code: str | None) -> Path:
    """Copy the sources to a temp dir (workers import from there); ``code``'s celery_streams."""
    root = common.snapshot_sources()
    if code:
        shutil.rmtree(root / 'celery_streams')
        shutil.copytree(Path(code) / 'celery_streams', root / 'celery_streams',
                        ignore=shutil.ignore_patterns('__pycache__'))
    return root


def script_names(server) -> dict:
    """{sha: script name} of the measured celery_streams' scripts."""
    names = {}
    try:
        from celery_streams.scripts import NAMES, Scripts
        scripts = Scripts(server.client())   # register_script: the SHA is computed locally
        names = {getattr(scripts, name).sha: name for name in NAMES}
    except Exception:   # an older layout: hash the files as they are
        folder = common.CODE_DIR / 'celery_streams' / 'scripts'
        for path in folder.glob('*.lua'):
            names[hashlib.sha1(path.read_bytes()).hexdigest()] = path.stem
    return names


def make_broker(name: str, server) -> common.Broker:
    import celery_streams  # noqa: F401  registers redis-streams://

    if name == STREAMS:
        return common.Broker(STREAMS, 'redis-streams://127.0.0.1:%d/0' % server.port, server)
    return common.Broker(KOMBU_REDIS, server.url(0), server)


def stats(server) -> tuple[dict, float]:
    """({command: (calls, usec)}, server CPU seconds) so far, this benchmark's commands left out."""
    client = server.client()
    cmds = {}
    for key, value in client.info('commandstats').items():
        name = key[len('cmdstat_'):].lower()
        if name.split('|')[0] not in OWN:
            cmds[name] = (value['calls'], value['usec'])
    io = client.info('stats')   # socket reads and writes: pseudo-commands, never listed as commands
    cmds['~reads'] = (io.get('total_reads_processed', 0), 0)
    cmds['~writes'] = (io.get('total_writes_processed', 0), 0)
    cpu = client.info('cpu')
    return cmds, cpu['used_cpu_sys'] + cpu['used_cpu_user']


def delta(before, after) -> dict:
    (cmds0, cpu0), (cmds1, cpu1) = before, after
    cmds = {}
    for name, (calls, usec) in cmds1.items():
        calls0, usec0 = cmds0.get(name, (0, 0))
        if calls - calls0 > 0:
            cmds[name] = (calls - calls0, usec - usec0)
    return {'cpu_s': cpu1 - cpu0, 'cmds': cmds}


def publish(app, queue, n, how):
    from .celery_workloads import NOOP

    with app.producer_or_acquire() as producer:
        if how == 'batch':
            with producer.batch(max_size=1000):
                for _ in range(n):
                    app.send_task(NOOP, queue=queue, producer=producer)
        else:
            for _ in range(n):
                app.send_task(NOOP, queue=queue, producer=producer)


#: ``--also-idle``: the workers keep consuming their idle queue next to the tasks' queue.
KEEP_IDLE = False


def switch_to(app, queue, idle, names) -> None:
    """Make the workers ``names`` consume ``queue`` (and leave ``idle`` unless :data:`KEEP_IDLE`)."""
    replies = app.control.add_consumer(queue, destination=names, reply=True, timeout=10)
    if len(replies) != len(names):
        raise RuntimeError('add_consumer answered by %d of %d workers' % (len(replies), len(names)))
    if not KEEP_IDLE:
        replies = app.control.cancel_consumer(idle, destination=names, reply=True, timeout=10)
        if len(replies) != len(names):
            raise RuntimeError('cancel_consumer answered by %d of %d workers' % (len(replies), len(names)))


def run_cost(name, acks_late, n, how, trace=False, settle=1.0) -> dict:
    """One configuration on a fresh server: commandstats/CPU deltas, and the slow log if ``trace``."""
    from . import celery_workloads as cw

    server = common.RedisServer().start()
    group = app = None
    try:
        broker = make_broker(name, server)
        if trace:
            server.client().config_set('slowlog-max-len', 10_000_000)
        key = 'cscost-' + uuid.uuid4().hex[:10]
        idle, queue = key + '-idle', key + '-tasks'
        app = cw.make_app(broker)
        counter = broker.counter()
        group = cw.Workers(broker, 1, idle, key, target=n, acks_late=acks_late)
        group.start(app)
        time.sleep(settle)   # the worker's start-up reads and renewals settle
        if trace:
            server.client().config_set('slowlog-log-slower-than', 0)
            server.client().slowlog_reset()
        s0, t0 = stats(server), time.perf_counter()
        publish(app, queue, n, how)
        s1, t1 = stats(server), time.perf_counter()
        switch_to(app, queue, idle, group.names)
        wait_until(lambda: counter.exists(key + ':last'), timeout=600, interval=0.02,
                   what='%d tasks done (%s so far)' % (n, counter.get(key + ':done')))
        s2, t2 = stats(server), time.perf_counter()
        entries = None
        if trace:
            server.client().config_set('slowlog-log-slower-than', 10_000)
            entries = server.client().execute_command('SLOWLOG', 'GET', '-1')
        first, last = float(counter.get(key + ':first')), float(counter.get(key + ':last'))
        return {'n': n, 'key': key, 'total': delta(s0, s2), 'publish': delta(s0, s1),
                'consume': delta(s1, s2), 'publish_s': t1 - t0, 'consume_s': t2 - t1,
                'rate': (n - 1) / (last - first), 'entries': entries,
                'scripts': script_names(server) if trace else {}}
    finally:
        if group:
            group.stop()
        if app:
            app.close()
        server.stop()


def run_scaling(name, workers, n, how) -> dict:
    """``workers`` workers drain the same ``n`` tasks: Redis CPU s / wall s while they do, tasks/s."""
    from . import celery_workloads as cw

    server = common.RedisServer().start()
    group = app = None
    try:
        broker = make_broker(name, server)
        key = 'csscale-' + uuid.uuid4().hex[:10]
        idle, queue = key + '-idle', key + '-tasks'
        options = cw.JOIN_OPTIONS.get(name, {})
        app = cw.make_app(broker, options)
        counter = broker.counter()
        group = cw.Workers(broker, workers, idle, key, target=n, options=options)
        group.start(app, timeout=120)
        time.sleep(1.0)
        publish(app, queue, n, how)
        s0, t0 = stats(server), time.perf_counter()
        switch_to(app, queue, idle, group.names)
        wait_until(lambda: counter.exists(key + ':last'), timeout=600, interval=0.02,
                   what='%d tasks done' % n)
        s1, t1 = stats(server), time.perf_counter()
        first, last = float(counter.get(key + ':first')), float(counter.get(key + ':last'))
        cpu = s1[1] - s0[1]
        return {'rate': (n - 1) / (last - first), 'wall_s': t1 - t0, 'cpu_s': cpu,
                'share': cpu / (t1 - t0), 'us_per_task': cpu * 1e6 / n}
    finally:
        if group:
            group.stop()
        if app:
            app.close()
        server.stop()


# -- attribution ---------------------------------------------------------------------------

def _text(value) -> str:
    return value.decode('utf-8', 'replace') if isinstance(value, bytes) else str(value)


def purpose(cmd: str, script: str | None, key: str, run_key: str) -> str:
    """What a command (or a script's own time) is for, from its name, script and first key."""
    if script == 'read':   # its first key rotates over the consumed queues (pidbox included)
        return 'reads'
    if key.startswith(run_key + ':'):
        if cmd in ('exists', 'get'):
            return 'benchmark driver (polls for the last task)'
        return "task body (the no-op's SET NX + INCR)"
    if 'pidbox' in key or 'celeryev' in key or 'reply.celery' in key:
        return "Celery control (ping, add_consumer)"
    if cmd in ('hincrby', 'pttl') or key.endswith(':ledger'):
        return 'ledger (counts per queue)'
    if ':alive:' in key:
        return 'liveness keys'
    if script == 'read' or cmd in ('xreadgroup',) or cmd in BLOCKING:
        return 'reads'
    if script == 'ack' or cmd in ('xack', 'xdel'):
        return 'acks'
    if script in ('route', 'append') or cmd in ('xadd', 'lpush', 'rpush', 'smembers'):
        return 'publish (route, append)'
    if script == 'promote' or cmd in ('zrangebyscore', 'zrange', 'time') or ':scheduled' in key:
        return 'promote checks (scheduled)'
    if script in ('reclaim', 'restore') or cmd in ('xautoclaim', 'xclaim', 'xpending'):
        return 'reclaim'
    if 'unacked' in key:
        return 'unacked index (kombu: visibility)'
    if cmd in ('multi', 'exec'):
        return 'transactions (MULTI/EXEC)'
    if script:
        return 'script %s' % script
    return 'other'


def first_key(cmd: str, args: list) -> str:
    if cmd in SCRIPT_CALLS:
        return _text(args[3]) if len(args) > 3 and _text(args[2]) != '0' else ''
    if cmd == 'xreadgroup':
        upper = [_text(a).upper() for a in args]
        return _text(args[upper.index('STREAMS') + 1]) if 'STREAMS' in upper else ''
    if cmd in ('time', 'multi', 'exec'):
        return ''
    return _text(args[1]) if len(args) > 1 else ''


def attribute(entries, scripts: dict, run_key: str) -> dict:
    """Rows of the slow log: {(command, label, parent, purpose): [calls, usec]}.

    ``parent`` is None for a top-level command, or the :func:`parent_key` of the script call
    or ``EXEC`` it ran inside; ``command`` is the name commandstats counts it under.
    """
    rows = defaultdict(lambda: [0, 0])
    pending = []          # commands of the Lua client, logged before their script
    in_multi = None       # the client whose MULTI block is being logged
    for entry in sorted(entries, key=lambda e: e[0]):
        duration, args, client = entry[2], entry[3], _text(entry[4]) if len(entry) > 4 else ''
        if not args:
            continue
        cmd = _text(args[0]).lower()
        if cmd in OWN:
            in_multi = None
            continue
        key = first_key(cmd, args)
        if client.startswith('?'):   # the Lua client: inside the script logged next
            pending.append((cmd, key, duration))
            continue
        if cmd in SCRIPT_CALLS:
            sha = _text(args[1]).lower() if cmd.startswith('evalsha') else ''
            script = scripts.get(sha, ('script %s' % sha[:8]) if sha else cmd)
            label, why = '%s %s' % (cmd.upper(), script), purpose(cmd, script, key, run_key)
            parent = parent_key(label, why)
            row = rows[(cmd, label, None, why)]
            row[0] += 1
            row[1] += duration
            for inner, inner_key, inner_duration in pending:
                row = rows[(inner, inner.upper(), parent, purpose(inner, None, inner_key, run_key))]
                row[0] += 1
                row[1] += inner_duration
            pending = []
            in_multi = None
            continue
        if cmd == 'multi':
            in_multi = client
        elif in_multi == client and cmd not in BLOCKING:
            row = rows[(cmd, cmd.upper(), EXEC_PARENT, purpose(cmd, None, key, run_key))]
            row[0] += 1
            row[1] += duration
            continue
        else:
            in_multi = None
        row = rows[(cmd, cmd.upper(), None, purpose(cmd, None, key, run_key))]
        row[0] += 1
        row[1] += duration
    return rows


def breakdown(measured: list, traced: dict | None) -> dict:
    """Per-task rows from the measured passes' commandstats, split by the traced pass' fractions.

    Returns {'cpu': µs/task, 'rows': [(label, parent, purpose, calls/task, µs/task)], ...}.
    """
    n = sum(r['n'] for r in measured)
    totals = defaultdict(lambda: [0, 0])
    for r in measured:
        for cmd, (calls, usec) in r['total']['cmds'].items():
            totals[cmd][0] += calls
            totals[cmd][1] += usec
    cpu = [r['total']['cpu_s'] * 1e6 / r['n'] for r in measured]
    split = attribute(traced['entries'], traced['scripts'], traced['key']) if traced else {}
    by_cmd = defaultdict(list)
    for (cmd, label, parent, why), (calls, usec) in split.items():
        by_cmd[cmd].append((label, parent, why, calls, usec))
    rows = []
    io = {name[1:]: totals.pop(name, (0, 0))[0] / n for name in ('~reads', '~writes')}
    for cmd, (calls, usec) in totals.items():
        parts = by_cmd.get(cmd)
        if not parts:
            rows.append((cmd.upper(), None, purpose(cmd, None, '', '\0'), calls / n, usec / n))
            continue
        all_calls = sum(p[3] for p in parts) or 1
        all_usec = sum(p[4] for p in parts)
        for label, parent, why, part_calls, part_usec in parts:
            share_usec = part_usec / all_usec if all_usec else part_calls / all_calls
            rows.append((label, parent, why, calls * part_calls / all_calls / n, usec * share_usec / n))
    return {'n': n, 'cpu': statistics.median(cpu), 'cpu_range': (min(cpu), max(cpu)), 'rows': rows,
            'publish_cpu': statistics.median(r['publish']['cpu_s'] * 1e6 / r['n'] for r in measured),
            'consume_cpu': statistics.median(r['consume']['cpu_s'] * 1e6 / r['n'] for r in measured),
            'rate': statistics.median(r['rate'] for r in measured), 'io': io}


def leaves(result) -> list:
    """(purpose, µs/task) pieces that add up to the command time: top-level commands, the
    commands inside scripts and transactions, and each script's (or EXEC's) own remainder."""
    rows = result['rows']
    out = []
    inner = defaultdict(float)
    for _label, parent, why, _calls, usec in rows:
        if parent:
            inner[parent] += usec
            out.append((why, usec))
    for label, parent, why, _calls, usec in rows:
        if parent:
            continue
        own = parent_key(label, why)
        out.append((why, usec - inner.get(own, 0.0) if own else usec))
    return out


def parent_key(label: str, why: str) -> str | None:
    """The ``parent`` its inner rows name, for a top-level script or EXEC row."""
    if label.partition(' ')[0].lower() in SCRIPT_CALLS or label == 'EXEC':
        return '%s @ %s' % (label, why)
    return None


# -- report --------------------------------------------------------------------------------

class Report:
    def __init__(self):
        self.lines = []

    def __call__(self, text=''):
        self.lines.append(text)
        print(text, flush=True)


def num(value) -> str:
    if value != value:
        return '-'
    if abs(value) >= 100:
        return '{:,.0f}'.format(value)
    if abs(value) >= 10:
        return '%.1f' % value
    return '%.2f' % value


def command_table(out, title, result):
    cpu = result['cpu']
    rows = result['rows']
    top = [r for r in rows if not r[1]]
    inner = defaultdict(list)
    for r in rows:
        if r[1]:
            inner[r[1]].append(r)
    command_time = sum(r[4] for r in top)
    pieces = defaultdict(float)
    for why, usec in leaves(result):
        pieces[why] += usec
    out('#### %s: %s µs of Redis CPU per task' % (title, num(cpu)))
    out()
    out('| purpose | command | calls / task | µs / task | share of Redis CPU |')
    out('|---|---|---|---|---|')
    for why in sorted(pieces, key=lambda w: -pieces[w]):
        for label, _parent, _why, calls, usec in sorted((r for r in top if r[2] == why), key=lambda r: -r[4]):
            if calls < 0.0005 and usec < 0.005:
                continue
            out('| %s | %s | %s | %s | %.1f%% |' % (why, label, num(calls), num(usec), usec / cpu * 100))
            own = parent_key(label, why)
            if own and inner.get(own):
                inside = sorted(inner[own], key=lambda r: -r[4])
                for ilabel, _p, iwhy, icalls, iusec in inside:
                    out('| %s | %s%s (inside) | %s | (%s) | (%.1f%%) |' % (
                        iwhy, INSIDE, ilabel, num(icalls), num(iusec), iusec / cpu * 100))
                rest = usec - sum(r[4] for r in inside)
                out('| %s | %s(%s itself) | | (%s) | (%.1f%%) |' % (
                    why, INSIDE, 'EXEC' if label == 'EXEC' else 'script', num(rest), rest / cpu * 100))
    out('| **all commands** (top level) | | | **%s** | **%.1f%%** |' % (num(command_time),
                                                                      command_time / cpu * 100))
    out('| outside commands (socket I/O, parsing, event loop, cron) | | | %s | %.1f%% |'
        % (num(cpu - command_time), (cpu - command_time) / cpu * 100))
    out('| **Redis CPU** (`INFO cpu`) | | | **%s** | 100%% |' % num(cpu))
    out()


def main(argv=None) -> int:
    global KEEP_IDLE
    args = parse(argv)
    KEEP_IDLE = args.also_idle
    prepare_code(args.code)
    out = Report()
    started = time.monotonic()
    load0 = os.getloadavg()
    try:
        version = subprocess.run(['redis-server', '--version'], capture_output=True, text=True,
                                 timeout=10).stdout.strip()
        commit = subprocess.run(['git', 'describe', '--always', '--dirty'], capture_output=True,
                                text=True, timeout=10, cwd=args.code or common.ROOT).stdout.strip()
        now = datetime.datetime.now(datetime.timezone.utc)
        out('## server-cost, %s UTC' % now.strftime('%Y-%m-%d %H:%M'))
        out()
        out('`python -m benchmarks server-cost %s`' % ' '.join(argv if argv is not None else sys.argv[2:]))
        out()
        out('| machine | |')
        out('|---|---|')
        out('| nproc | %d |' % os.cpu_count())
        out('| redis-server --version | %s |' % version)
        out('| load average at start (1, 5, 15 min) | %.2f, %.2f, %.2f |' % load0)
        out('| celery_streams | %s, git %s, sources sha256 %s |' % (
            args.code or 'this checkout', commit, common.sources_digest()))
        out('| tasks per run | %s, published %s; attribution pass: %s tasks |' % (
            '{:,}'.format(args.tasks), 'in Producer.batch()' if args.publish == 'batch' else 'one by one',
            '{:,}'.format(args.trace_tasks) if args.trace_tasks else 'none'))
        out()
        results = {}
        if not args.no_cost:
            measured = defaultdict(list)
            for r in range(args.rounds):
                for late, ack_label in ACKS:
                    for name in args.transports:
                        res = run_cost(name, late, args.tasks, args.publish)
                        measured[(name, late)].append(res)
                        print('[%4.0fs] %s, %s, round %d: %.1f µs/task, %.0f tasks/s' % (
                            time.monotonic() - started, name, ack_label, r + 1,
                            res['total']['cpu_s'] * 1e6 / res['n'], res['rate']), flush=True)
            for late, ack_label in ACKS:
                for name in args.transports:
                    traced = None
                    if args.trace_tasks:
                        traced = run_cost(name, late, args.trace_tasks, args.publish, trace=True)
                        print('[%4.0fs] %s, %s, attribution pass: %d slow log entries' % (
                            time.monotonic() - started, name, ack_label, len(traced['entries'])), flush=True)
                    results[(name, late)] = breakdown(measured[(name, late)], traced)
            report_costs(out, args, results)
        if args.workers:
            report_scaling(out, args, started)
        out('Total time: %.0f s; load average at the end (1, 5, 15 min): %.2f, %.2f, %.2f.'
            % ((time.monotonic() - started,) + os.getloadavg()))
        out()
    finally:
        if common.CODE_DIR != common.ROOT:
            shutil.rmtree(common.CODE_DIR, ignore_errors=True)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text('\n'.join(out.lines) + '\n')
        print('written to %s' % args.output)
    return 0


def report_costs(out, args, results):
    configs = [(name, late, label) for late, label in ACKS for name in args.transports]
    out('### Redis CPU per task: publish + consume + ack')
    out()
    out('| transport | acks | Redis CPU µs / task | of which publish | consume + ack | '
        'in commands | outside commands | top-level commands / task | socket reads / writes per task | '
        'outside µs per socket read | consume rate, tasks/s |')
    out('|---|---|---|---|---|---|---|---|---|---|---|')
    for name, late, label in configs:
        res = results[(name, late)]
        cmd_time = sum(r[4] for r in res['rows'] if not r[1])
        calls = sum(r[3] for r in res['rows'] if not r[1])
        lo, hi = res['cpu_range']
        spread = ' (%s–%s)' % (num(lo), num(hi)) if args.rounds > 1 else ''
        reads, writes = res['io']['reads'], res['io']['writes']
        out('| %s | %s | **%s**%s | %s | %s | %s | %s | %s | %s / %s | %s | %s |' % (
            name, label, num(res['cpu']), spread, num(res['publish_cpu']), num(res['consume_cpu']),
            num(cmd_time), num(res['cpu'] - cmd_time), num(calls), num(reads), num(writes),
            num((res['cpu'] - cmd_time) / reads) if reads else '-', '{:,.0f}'.format(res['rate'])))
    out()
    if STREAMS in args.transports and KOMBU_REDIS in args.transports:
        for late, label in ACKS:
            ratio = results[(STREAMS, late)]['cpu'] / results[(KOMBU_REDIS, late)]['cpu']
            out('- %s: celery_streams / kombu redis = **%.2f×**' % (label, ratio))
        out()
    out('### Capacity: tasks per second one Redis core can serve')
    out()
    out('1e6 / (Redis CPU µs per task) from the table above: publish, consume and ack of a no-op '
        'task, the task\'s own SET NX + INCR included.')
    out()
    out('| transport | %s | %s |' % (' | '.join(label for _, label in ACKS), ' | '.join(
        '%s, without the task body and driver commands' % label for _, label in ACKS)))
    out('|---|%s' % ('---|' * 2 * len(ACKS)))
    for name in args.transports:
        cells = ['{:,.0f}'.format(1e6 / results[(name, late)]['cpu']) for late, _ in ACKS]
        for late, _ in ACKS:
            body = sum(usec for why, usec in leaves(results[(name, late)])
                       if why.startswith(('task body', 'benchmark driver')))
            cells.append('{:,.0f}'.format(1e6 / (results[(name, late)]['cpu'] - body)))
        out('| %s | %s |' % (name, ' | '.join(cells)))
    out()
    out('(The second pair leaves out only the command time of the no-op\'s SET NX + INCR and of the '
        'driver\'s polling, not their share of socket I/O: an upper bound for the transport alone.)')
    out()
    out('### Redis time per task by purpose, µs (share of Redis CPU)')
    out()
    pieces = {}
    for name, late, _label in configs:
        acc = defaultdict(float)
        for why, usec in leaves(results[(name, late)]):
            acc[why] += usec
        pieces[(name, late)] = acc
    whys = sorted({w for acc in pieces.values() for w in acc},
                  key=lambda w: -max(acc.get(w, 0) for acc in pieces.values()))
    out('| purpose | %s |' % ' | '.join('%s, %s' % (name, label) for name, _, label in configs))
    out('|---|%s' % ('---|' * len(configs)))
    for why in whys:
        cells = []
        for name, late, _ in configs:
            usec = pieces[(name, late)].get(why)
            cells.append('-' if usec is None or abs(usec) < 0.005 else '%s (%.0f%%)' % (
                num(usec), usec / results[(name, late)]['cpu'] * 100))
        out('| %s | %s |' % (why, ' | '.join(cells)))
    cells = []
    for name, late, _ in configs:
        res = results[(name, late)]
        outside = res['cpu'] - sum(pieces[(name, late)].values())
        cells.append('%s (%.0f%%)' % (num(outside), outside / res['cpu'] * 100))
    out('| outside commands (socket I/O, parsing, event loop) | %s |' % ' | '.join(cells))
    out('| **Redis CPU** | %s |' % ' | '.join('**%s**' % num(results[(n, lt)]['cpu'])
                                           for n, lt, _ in configs))
    out()
    out('Script and EXEC time is split into the commands they run (each under its own purpose: '
        'the HINCRBY of the ack script counts as ledger) and the script\'s own remainder.')
    out()
    out('### Per command')
    out()
    for name, late, label in configs:
        command_table(out, '%s, %s' % (name, label), results[(name, late)])


def report_scaling(out, args, started):
    out('### Scaling: 1, 2 and 4 workers on the same backlog')
    out()
    out('%s no-op tasks queued, then %s worker(s) (`-P prefork -c 2` each, acks early, '
        '`polling_interval` 0.1 so that they join together) drain them; Redis CPU seconds / wall '
        'seconds from `add_consumer` to the last task; tasks/s = tasks / (end of the last - start '
        'of the first). One run each.' % ('{:,}'.format(args.scaling_tasks),
                                          ', '.join(map(str, args.workers))))
    out()
    out('| workers | transport | tasks/s | Redis CPU s / wall s | Redis CPU µs / task (consume) | wall s |')
    out('|---|---|---|---|---|---|')
    for count in args.workers:
        for name in args.transports:
            try:
                res = run_scaling(name, count, args.scaling_tasks, args.publish)
            except Exception as exc:
                out('| %d | %s | failed: %s | | | |' % (count, name, exc))
                continue
            print('[%4.0fs] scaling %s x%d done' % (time.monotonic() - started, name, count), flush=True)
            out('| %d | %s | %s | %.0f%% | %s | %.1f |' % (
                count, name, '{:,.0f}'.format(res['rate']), res['share'] * 100,
                num(res['us_per_task']), res['wall_s']))
    out()
