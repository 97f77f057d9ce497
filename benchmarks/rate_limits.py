"""Global rate limits (issue #23): ``python -m benchmarks rate-limits [--quick] [--tasks 3000]
[--only global,mixed,idle] [--rounds 2] [--idle-seconds 30] [--code DIR]``.

Not part of CI. It starts a private ``redis-server`` (no persistence, a free port) and real
``celery worker`` subprocesses running :mod:`benchmarks.limits_app` (``--without-gossip
--without-mingle --without-heartbeat``, no result backend, acks early, default prefetch); the
limits are given as the workers' ``rate_limits`` transport option (written to Redis when they
start consuming). Every task records ``time.time()`` at its start in a Redis list. The server is
flushed and the workers started afresh for every run. The parts:

* **global**: 4 workers -- 2 ``-P prefork -c 2``, 1 ``-P threads -c 2``, 1 ``-P solo`` --
  consume one queue; once all answer ``ping``, ``--tasks`` no-op tasks (default 3,000;
  ``--quick``: 600) are published in ``Producer.batch(max_size=1000)`` under ``'50/s'`` on their
  task name (``--rate``). From the start times: the count in every whole 1 s window from the
  first start (min / max / mean, the mean's error against the rate), the most started in any
  100 ms (and any 1 s) sliding window, the gaps between starts, the lag behind an ideal schedule
  (first start + i / rate), the total duration, starts per worker and duplicates.
* **mixed**: one ``-P prefork -c 2`` worker; ``--mixed-a`` (200) tasks A then ``--mixed-b``
  (2,000) tasks B behind them in one queue, A limited to ``'5/s'``, B not; against the same run
  without any limit. B's throughput (first to last start) and its latency (publish to start,
  p50/p95/max), how many A started before the last B, A's rate. ``--rounds`` times, alternating.
* **idle**: one ``-P prefork -c 2`` worker, the CPU seconds of the worker (its main process and
  its pool processes, ``/proc/<pid>/stat``, as :mod:`benchmarks.idle`) and of Redis (``INFO
  cpu``) over ``--idle-seconds`` (30) after 10 s of settling, for: an empty queue without limits
  (:mod:`benchmarks.idle`'s case), an empty queue with the limit configured, and a queue holding
  100 tasks under ``'1/m'`` (one starts, 99 wait in the schedule; none comes due in the window).
  Also the Redis commands sent in the window. ``--rounds`` times, alternating.

Results are printed as markdown tables at the end (progress lines before them). As the other
benchmarks, a run measures a copy of ``celery_streams/`` made at its start (``--code DIR``: of
``DIR/celery_streams``, e.g. a ``git worktree`` of an older commit); the first line names the
hash of the measured sources (:func:`benchmarks.common.sources_digest`).
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

if __package__ in (None, ''):   # ``python benchmarks/rate_limits.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = 'benchmarks'

from benchmarks import common  # noqa: E402
from benchmarks.common import RedisServer, percentile, wait_until  # noqa: E402
from benchmarks.idle import cpu_seconds, redis_cpu  # noqa: E402

APP = 'benchmarks.limits_app'
RUN, TASK_A, TASK_B, SLOW = 'limits.run', 'limits.a', 'limits.b', 'limits.slow'
PARTS = ('global', 'mixed', 'idle')
#: The workers of the global part: (pool, concurrency or None).
GLOBAL_POOLS = (('prefork', 2), ('prefork', 2), ('threads', 2), ('solo', None))
ONE_PREFORK = (('prefork', 2),)
SETTLE = 10.0          # seconds between a worker answering ping and the idle measurement
IDLE_HELD = 100        # tasks of the idle-throttled case
IDLE_RATE = '1/m'


def log(*args):
    print(*args, flush=True)


def load() -> str:
    return '%.2f/%.2f/%.2f' % os.getloadavg()


# -- workers ------------------------------------------------------------------------------------

class Workers:
    """``celery worker`` subprocesses of :mod:`benchmarks.limits_app`, one per ``pools`` item,
    consuming ``queue``; logs in a temp dir. Each in its own session (stopped with its pool)."""

    def __init__(self, server: RedisServer, key: str, queue: str, pools, options: dict):
        self.dir = Path(tempfile.mkdtemp(prefix='cs-bench-limits-'))
        self.pools = list(pools)
        self.names = ['rl%d-%s-%s@%s' % (i, pool, key[-6:], os.uname().nodename)
                      for i, (pool, _) in enumerate(self.pools)]
        self.queue = queue
        self.env = dict(os.environ, LIMITS_BROKER='redis-streams://127.0.0.1:%d/0' % server.port,
                        LIMITS_RECORD=server.url(15), LIMITS_KEY=key,
                        LIMITS_OPTIONS=json.dumps(options or {}),
                        PYTHONPATH=str(common.CODE_DIR) + os.pathsep + os.environ.get('PYTHONPATH', ''))
        self.procs: list[subprocess.Popen] = []

    def start(self, app, timeout=120):
        for name, (pool, concurrency) in zip(self.names, self.pools):
            command = [sys.executable, '-m', 'celery', '-A', APP, 'worker', '-P', pool,
                       '-l', 'WARNING', '-n', name, '-Q', self.queue,
                       '--without-gossip', '--without-mingle', '--without-heartbeat']
            if concurrency:
                command += ['-c', str(concurrency)]
            with open(self.dir / (name.split('@')[0] + '.log'), 'wb') as out:
                self.procs.append(subprocess.Popen(command, env=self.env, cwd=common.CODE_DIR,
                                                   stdout=out, stderr=subprocess.STDOUT,
                                                   start_new_session=True))
        common.wait_for_workers(app, self.names, self.procs, timeout, self.log_tail)
        return self

    def log_tail(self) -> str:
        return ' | '.join(p.read_text(errors='replace')[-800:] for p in self.dir.glob('*.log'))

    def warnings(self) -> list[str]:
        """The workers' log records (WARNING and above) and tracebacks; not the banner, nor
        Celery's warning about running as root."""
        lines = []
        for path in sorted(self.dir.glob('*.log')):
            lines += ['%s: %s' % (path.stem, line) for line in
                      path.read_text(errors='replace').splitlines()
                      if re.search(r': (WARNING|ERROR|CRITICAL)/|Traceback', line)
                      and 'superuser privileges' not in line]
        return lines

    def stop(self):
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (``/proc/<pid>/task/<tid>/children``)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir('/proc/%d/task' % current):
                with open('/proc/%d/task/%s/children' % (current, task)) as f:
                    todo += [int(child) for child in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found


def tree_cpu(pids) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def client_app(server: RedisServer):
    from celery import Celery
    return Celery('cslimits-client', broker='redis-streams://127.0.0.1:%d/0' % server.port,
                  set_as_current=False,
                  config_source={'broker_connection_retry_on_startup': True})


def publish(app, tasks):
    """Send ``tasks`` (``(name, queue)``), each with its send time, in ``Producer.batch``."""
    with app.producer_or_acquire() as producer, producer.batch(max_size=1000):
        for name, queue in tasks:
            app.send_task(name, (time.time(),), queue=queue, producer=producer)


def records(server: RedisServer, key: str, kind: str) -> list[tuple[float, float, str, str]]:
    """``(start, sent, hostname, task id)`` of every start recorded, by start time."""
    out = []
    for item in server.client(15).lrange('%s:%s' % (key, kind), 0, -1):
        start, sent, host, task_id = item.decode().split(' ', 3)
        out.append((float(start), float(sent), host, task_id))
    return sorted(out)


def wait_for(server, key, kind, count, timeout):
    client = server.client(15)
    name = '%s:%s' % (key, kind)
    wait_until(lambda: client.llen(name) >= count, timeout, interval=0.05,
               what='%d %s tasks started (%s so far)' % (count, kind, client.llen(name)))


def throttled_count(server, queue) -> int:
    from celery_streams import ledger
    return ledger.audit(server.client(), queues=[queue])[0].count('throttled')


# -- 1. the global rate -------------------------------------------------------------------------

def pace_stats(times: list[float], rate: float) -> dict:
    """What the start times of one run show against ``rate`` (tasks/s)."""
    times = sorted(times)
    n, first = len(times), times[0]
    duration = times[-1] - first
    windows = [bisect.bisect_left(times, first + k + 1) - bisect.bisect_left(times, first + k)
               for k in range(int(duration))]                 # whole 1 s windows only
    in_100ms = [bisect.bisect_left(times, t + 0.1) - i for i, t in enumerate(times)]
    burst_100ms = max(in_100ms)
    ideal_100ms = rate / 10
    tenths = [bisect.bisect_left(times, first + (k + 1) / 10) - bisect.bisect_left(times, first + k / 10)
              for k in range(int(duration * 10))]   # whole fixed 100 ms windows
    max_1s = max(bisect.bisect_left(times, t + 1.0) - i for i, t in enumerate(times))
    gaps = [(b - a) * 1000 for a, b in zip(times, times[1:])]
    lags = [(t - (first + i / rate)) * 1000 for i, t in enumerate(times)]
    mean = statistics.mean(windows) if windows else float('nan')
    return {
        'tasks': n, 'duration_s': duration,
        'rate': (n - 1) / duration if duration else float('nan'),
        'windows': windows,
        'win_min': min(windows) if windows else 0, 'win_max': max(windows) if windows else 0,
        'win_mean': mean, 'win_mean_err_pct': (mean - rate) / rate * 100,
        'win_stdev': statistics.pstdev(windows) if windows else float('nan'),
        'burst_100ms': burst_100ms, 'max_1s_sliding': max_1s,
        'burst_at_s': times[in_100ms.index(burst_100ms)] - first,
        'tenths_over_2x': sum(1 for c in tenths if c > 2 * ideal_100ms), 'tenths': len(tenths),
        'tenths_hist': {c: tenths.count(c) for c in sorted(set(tenths))},
        'gap_min_ms': min(gaps), 'gap_p50_ms': percentile(gaps, 50), 'gap_p99_ms': percentile(gaps, 99),
        'gap_max_ms': max(gaps),
        'lag_min_ms': min(lags), 'lag_max_ms': max(lags), 'lag_end_ms': lags[-1],
    }


def run_global(server: RedisServer, n: int, rate: str) -> dict:
    server.flush()
    key = 'rl-' + uuid.uuid4().hex[:10]
    queue = key + '-global'
    per_second = float(rate.split('/')[0]) / {'s': 1, 'm': 60, 'h': 3600}[(rate.split('/') + ['s'])[1]]
    app = client_app(server)
    group = Workers(server, key, queue, GLOBAL_POOLS, {'rate_limits': {RUN: rate}})
    try:
        group.start(app)
        log('  global: %d workers up (%s), publishing %d tasks under %s, load %s'
            % (len(group.names), ', '.join(p for p, _ in GLOBAL_POOLS), n, rate, load()))
        began = time.time()
        publish(app, [(RUN, queue)] * n)
        published = time.time() - began
        wait_for(server, key, 'run', n, timeout=n / per_second * 2 + 60)
        time.sleep(1.0)   # anything started twice shows up
        found = records(server, key, 'run')
        stats = pace_stats([start for start, *_ in found], per_second)
        hosts: dict = {}
        for _, _, host, _ in found:
            short = host.split('@')[0].split('-')[:2]
            hosts['-'.join(short)] = hosts.get('-'.join(short), 0) + 1
        first = found[0][0]
        stats['first_starts'] = [('%.0f' % ((start - first) * 1000), host.split('-')[0])
                                 for start, _, host, _ in found if start - first < 1.5]
        stats.update(publish_s=published, first_after_publish_s=found[0][0] - began,
                     per_worker=hosts, duplicates=len(found) - len({tid for *_, tid in found}),
                     throttled=throttled_count(server, queue), load=load(),
                     warnings=group.warnings())
        return stats
    finally:
        group.stop()
        app.close()


# -- 2. a limited task and an unlimited one in one queue ----------------------------------------

def run_mixed(server: RedisServer, n_a: int, n_b: int, rate: str | None) -> dict:
    server.flush()
    key = 'rl-' + uuid.uuid4().hex[:10]
    queue = key + '-mixed'
    app = client_app(server)
    options = {'rate_limits': {TASK_A: rate}} if rate else {}
    group = Workers(server, key, queue, ONE_PREFORK, options)
    try:
        group.start(app)
        began = time.time()
        publish(app, [(TASK_A, queue)] * n_a + [(TASK_B, queue)] * n_b)
        wait_for(server, key, 'b', n_b, timeout=300)
        per_second = None
        if rate:
            count, _, unit = rate.partition('/')
            per_second = float(count) / {'s': 1, 'm': 60, 'h': 3600}[unit or 's']
        wait_for(server, key, 'a', n_a, timeout=(n_a / per_second if per_second else 0) * 1.5 + 120)
        a, b = records(server, key, 'a'), records(server, key, 'b')
        b_starts = [start for start, *_ in b]
        latencies = [(start - sent) * 1000 for start, sent, *_ in b]
        a_starts = [start for start, *_ in a]
        return {
            'b_rate': (n_b - 1) / (b_starts[-1] - b_starts[0]),
            'b_done_s': b_starts[-1] - began,
            'b_p50_ms': percentile(latencies, 50), 'b_p95_ms': percentile(latencies, 95),
            'b_max_ms': max(latencies),
            'a_before_last_b': sum(1 for t in a_starts if t < b_starts[-1]),
            'a_rate': (n_a - 1) / (a_starts[-1] - a_starts[0]) if n_a > 1 else float('nan'),
            'a_burst_1s': max(bisect.bisect_left(a_starts, t + 1.0) - i for i, t in enumerate(a_starts)),
            'throttled': throttled_count(server, queue),
            'duplicates': len(a) + len(b) - len({tid for *_, tid in a + b}),
            'load': load(), 'warnings': group.warnings(),
        }
    finally:
        group.stop()
        app.close()


# -- 3. what a worker waiting on throttled tasks costs ------------------------------------------

IDLE_CASES = ('empty, no limit', 'empty, limit set', 'throttled')


def run_idle(server: RedisServer, case: str, seconds: float) -> dict:
    from celery_streams.keys import Keys

    server.flush()
    key = 'rl-' + uuid.uuid4().hex[:10]
    queue = key + '-idle'
    app = client_app(server)
    options = {} if case == 'empty, no limit' else {'rate_limits': {SLOW: IDLE_RATE}}
    group = Workers(server, key, queue, ONE_PREFORK, options)
    try:
        group.start(app)
        ready = time.monotonic()
        if case == 'throttled':
            publish(app, [(SLOW, queue)] * IDLE_HELD)
            schedule = Keys('').scheduled(queue)
            wait_until(lambda: server.client().zcard(schedule) >= IDLE_HELD - 1, 30, interval=0.05,
                       what='%d tasks held in the schedule' % (IDLE_HELD - 1))
        time.sleep(max(0.0, ready + SETTLE - time.monotonic()))
        pids = process_tree(group.procs[0].pid)
        before_calls = server.snapshot()[0]
        worker0, redis0, began = tree_cpu(pids), redis_cpu(server), time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - began
        worker1, redis1 = tree_cpu(pids), redis_cpu(server)
        calls = server.snapshot()[0]
        commands = {cmd: count - before_calls.get(cmd, 0) for cmd, count in calls.items()
                    if cmd not in ('info',) and count - before_calls.get(cmd, 0) > 0}
        result = {'worker_cpu_s': worker1 - worker0, 'redis_cpu_s': redis1 - redis0,
                  'seconds': elapsed, 'processes': len(pids),
                  'redis_cmds_per_s': sum(commands.values()) / elapsed,
                  'commands': dict(sorted(commands.items(), key=lambda kv: -kv[1])),
                  'load': load(), 'warnings': group.warnings()}
        if case == 'throttled':
            result['held'] = server.client().zcard(Keys('').scheduled(queue))
            result['started'] = server.client(15).llen(key + ':slow')
        return result
    finally:
        group.stop()
        app.close()


def snapshot_code(code: Path) -> Path:
    """:func:`benchmarks.common.snapshot_sources`, with ``celery_streams`` copied from ``code``
    (another checkout, or a copy a run made earlier) and ``benchmarks`` from this one."""
    common.CODE_DIR = Path(tempfile.mkdtemp(prefix='cs-bench-src-'))
    for package, source in (('celery_streams', code), ('benchmarks', common.ROOT)):
        shutil.copytree(source / package, common.CODE_DIR / package,
                        ignore=shutil.ignore_patterns('__pycache__', 'results'))
    sys.path.insert(0, str(common.CODE_DIR))
    os.environ['PYTHONPATH'] = str(common.CODE_DIR) + os.pathsep + os.environ.get('PYTHONPATH', '')
    return common.CODE_DIR


# -- the command --------------------------------------------------------------------------------

def fmt_windows(windows) -> str:
    return ' '.join(str(w) for w in windows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='python -m benchmarks rate-limits')
    parser.add_argument('--tasks', type=int, default=None, help='tasks of the global part (3000)')
    parser.add_argument('--rate', default='50/s', help='the limit of the global part')
    parser.add_argument('--quick', action='store_true', help='600 tasks, 1 round, 60/400 mixed, 15 s idle')
    parser.add_argument('--only', default=','.join(PARTS), help='parts: ' + ','.join(PARTS))
    parser.add_argument('--rounds', type=int, default=None, help='rounds of mixed and idle (2)')
    parser.add_argument('--mixed-a', type=int, default=None, help='limited tasks A (200)')
    parser.add_argument('--mixed-b', type=int, default=None, help='unlimited tasks B (2000)')
    parser.add_argument('--mixed-rate', default='5/s')
    parser.add_argument('--idle-seconds', type=float, default=None, help='(30)')
    parser.add_argument('--live-sources', action='store_true',
                        help='import the work tree as it is (default: a copy made at the start)')
    parser.add_argument('--code', help='measure the celery_streams/ of this directory (a copy of it '
                                       'made at the start) instead of the work tree')
    args = parser.parse_args(argv)
    quick = args.quick
    tasks = args.tasks or (600 if quick else 3000)
    rounds = args.rounds or (1 if quick else 2)
    n_a = args.mixed_a if args.mixed_a is not None else (60 if quick else 200)
    n_b = args.mixed_b if args.mixed_b is not None else (400 if quick else 2000)
    idle_seconds = args.idle_seconds or (15.0 if quick else 30.0)
    parts = [p.strip() for p in args.only.split(',') if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error('unknown parts: %s' % ', '.join(sorted(unknown)))
    if args.code:
        snapshot_code(Path(args.code))
    elif not args.live_sources:
        common.snapshot_sources()
    server = RedisServer().start()
    lines: list[str] = []
    try:
        log('rate-limits: %d cores, Redis %s, load %s, sources sha256 %s (%s)'
            % (os.cpu_count(), server.version(), load(), common.sources_digest(), common.CODE_DIR))
        if 'global' in parts:
            lines += part_global(server, tasks, args.rate)
        if 'mixed' in parts:
            lines += part_mixed(server, n_a, n_b, args.mixed_rate, rounds)
        if 'idle' in parts:
            lines += part_idle(server, idle_seconds, rounds)
    finally:
        server.stop()
    print()
    print('\n'.join(lines))
    return 0


def part_global(server, tasks, rate) -> list[str]:
    log('global rate: %d tasks under %s' % (tasks, rate))
    s = run_global(server, tasks, rate)
    for line in s['warnings']:
        log('  worker log: ' + line[:300])
    log('  windows (tasks started in each whole second): ' + fmt_windows(s['windows']))
    log('  fixed 100 ms windows, starts -> how many windows: %s' % s['tenths_hist'])
    log('  starts in the first 1.5 s (ms after the first, worker): %s'
        % ' '.join('%s:%s' % start for start in s['first_starts']))
    target = float(rate.split('/')[0]) / {'s': 1, 'm': 60, 'h': 3600}[(rate.split('/') + ['s'])[1]]
    far = [(i, w) for i, w in enumerate(s['windows']) if abs(w - target) > 0.1 * target]
    return [
        '### Global rate: %d tasks under %s, 4 workers (2 prefork -c 2, threads -c 2, solo)'
        % (s['tasks'], rate),
        '',
        '| figure | value |', '|---|---|',
        '| 1 s windows (whole, from the first start) | %d |' % len(s['windows']),
        '| per 1 s window: min / max / mean (stdev) | %d / %d / %.2f (%.2f) |'
        % (s['win_min'], s['win_max'], s['win_mean'], s['win_stdev']),
        "| mean's error against %g/s | %+.2f %% |" % (target, s['win_mean_err_pct']),
        '| windows off by more than 10 %% | %s |' % (', '.join('s%d: %d' % f for f in far) or 'none'),
        '| most started in any 100 ms (sliding) | %d (at %.2f s; %g at the rate) |'
        % (s['burst_100ms'], s['burst_at_s'], target / 10),
        '| fixed 100 ms windows with more than twice the rate | %d of %d |'
        % (s['tenths_over_2x'], s['tenths']),
        '| most started in any 1 s (sliding) | %d |' % s['max_1s_sliding'],
        '| gap between starts, ms: min / p50 / p99 / max | %.1f / %.1f / %.1f / %.1f |'
        % (s['gap_min_ms'], s['gap_p50_ms'], s['gap_p99_ms'], s['gap_max_ms']),
        '| lag behind first + i/rate, ms: min / max / at the end | %.1f / %.1f / %.1f |'
        % (s['lag_min_ms'], s['lag_max_ms'], s['lag_end_ms']),
        '| total duration (first to last start) | %.2f s (%.3f tasks/s) |' % (s['duration_s'], s['rate']),
        '| publish (batch) / first start after publish began | %.2f s / %.3f s |'
        % (s['publish_s'], s['first_after_publish_s']),
        '| starts per worker | %s |' % ', '.join('%s %d' % kv for kv in sorted(s['per_worker'].items())),
        '| started twice / holds counted (ledger `throttled`) | %d / %d |'
        % (s['duplicates'], s['throttled']),
        '| load average (1/5/15 min) at the end | %s |' % s['load'],
        '',
    ]


def part_mixed(server, n_a, n_b, rate, rounds) -> list[str]:
    log('mixed queue: %d A (%s) then %d B (no limit), 1 worker prefork -c 2, %d rounds'
        % (n_a, rate, n_b, rounds))
    results: dict = {'limited': [], 'no limit': []}
    for r in range(rounds):
        for label, limit in (('limited', rate), ('no limit', None)):
            res = run_mixed(server, n_a, n_b, limit)
            for line in res['warnings']:
                log('  worker log: ' + line[:300])
            results[label].append(res)
            log('  round %d %-8s B %.0f tasks/s, done %.2f s after publish, latency p50 %.0f ms '
                'p95 %.0f ms max %.0f ms; A before last B %d, A rate %.3f/s (max %d in 1 s), '
                'holds %d, twice %d, load %s'
                % (r + 1, label, res['b_rate'], res['b_done_s'], res['b_p50_ms'], res['b_p95_ms'],
                   res['b_max_ms'], res['a_before_last_b'], res['a_rate'], res['a_burst_1s'],
                   res['throttled'], res['duplicates'], res['load']))
    out = ['### Mixed queue: %d A (%s) published before %d B (no limit), 1 worker -P prefork -c 2'
           % (n_a, rate, n_b), '',
           '| run | B tasks/s | B done after publish, s | B latency p50 / p95 / max, ms '
           '| A started before the last B | A tasks/s (first to last) | most A in any 1 s | holds | load |',
           '|---|---|---|---|---|---|---|---|---|']
    for label in ('limited', 'no limit'):
        for r, res in enumerate(results[label]):
            out.append('| %s, round %d | %.0f | %.2f | %.0f / %.0f / %.0f | %d | %.3f | %d | %d | %s |'
                       % (label, r + 1, res['b_rate'], res['b_done_s'], res['b_p50_ms'],
                          res['b_p95_ms'], res['b_max_ms'], res['a_before_last_b'], res['a_rate'],
                          res['a_burst_1s'], res['throttled'], res['load']))
    for label in ('limited', 'no limit'):
        rs = results[label]
        if rs:
            out.append('| **%s, median** | %.0f | %.2f | %.0f / %.0f / %.0f | | | | | |'
                       % (label, statistics.median(x['b_rate'] for x in rs),
                          statistics.median(x['b_done_s'] for x in rs),
                          statistics.median(x['b_p50_ms'] for x in rs),
                          statistics.median(x['b_p95_ms'] for x in rs),
                          statistics.median(x['b_max_ms'] for x in rs)))
    return out + ['']


def part_idle(server, seconds, rounds) -> list[str]:
    log('idle cost: 1 worker prefork -c 2, %g s after %g s settling, %d rounds' % (seconds, SETTLE, rounds))
    results: dict = {case: [] for case in IDLE_CASES}
    for r in range(rounds):
        for case in IDLE_CASES:
            res = run_idle(server, case, seconds)
            for line in res['warnings']:
                log('  worker log: ' + line[:300])
            results[case].append(res)
            log('  round %d %-16s worker %.3f CPU s (%d processes), Redis %.3f CPU s, %.1f cmds/s %s%s, '
                'load %s' % (r + 1, case, res['worker_cpu_s'], res['processes'], res['redis_cpu_s'],
                             res['redis_cmds_per_s'], res['commands'],
                             ' (held %d, started %d)' % (res['held'], res['started'])
                             if 'held' in res else '', res['load']))
    out = ['### Idle cost: 1 worker -P prefork -c 2, CPU over %g s' % seconds, '',
           '| case | round | worker CPU s (all processes) | % of a core | Redis CPU s | % of a core '
           '| Redis commands/s | load |', '|---|---|---|---|---|---|---|---|']
    for case in IDLE_CASES:
        for r, res in enumerate(results[case]):
            out.append('| %s | %d | %.3f | %.2f | %.3f | %.2f | %.1f | %s |'
                       % (case + (' (%d held, %s)' % (res['held'], IDLE_RATE) if 'held' in res else ''),
                          r + 1, res['worker_cpu_s'], res['worker_cpu_s'] / res['seconds'] * 100,
                          res['redis_cpu_s'], res['redis_cpu_s'] / res['seconds'] * 100,
                          res['redis_cmds_per_s'], res['load']))
    return out + ['']


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
