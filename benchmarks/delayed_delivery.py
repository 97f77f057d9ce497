"""Delayed delivery side by side with kombu's Redis transport (issue #13):
``python -m benchmarks delayed-delivery [--quick] [--only memory,spread,lateness]``.

Not part of CI. It starts a private ``redis-server`` (no persistence) and runs
every part for three configurations, one after the other, the server flushed
between runs:

* **on**: celery_streams with ``delayed_delivery`` on (the default): a task
  whose countdown is further ahead than the threshold waits in the queue's
  schedule in Redis and is moved into the stream when due;
* **off**: celery_streams with ``delayed_delivery: False``: the worker reads
  the task at once and holds it in memory (Celery's ETA timer);
* **kombu redis**: kombu's own Redis transport (``redis://``, lists), on the
  same server: the worker holds it too (in the ``unacked`` hash in Redis and
  in memory).

Workers are real ``celery worker`` subprocesses running
:mod:`benchmarks.celery_app` (``--without-gossip --without-mingle
--without-heartbeat``, no result backend), ``-P prefork -c 2`` unless said
otherwise. The parts:

* **memory** (``--held``, default 100,000): first the publish rate of
  scheduled tasks, one ``send_task`` at a time (5,000 with countdowns, then the
  same without, into a queue nobody consumes); then ``--held`` tasks with
  countdowns spread uniformly from 5 minutes to 1 hour ahead (none comes due
  during the run) sent in ``Producer.batch(max_size=1000)`` to one idle
  worker. Until they are all in place (on: the schedule's ``ZCARD``; off: the
  group's PEL; kombu redis: ``HLEN unacked``, i.e. the worker reserved them)
  and the worker's RSS settled: the worker main process's ``VmRSS`` and the
  server's ``used_memory``, before and after.
* **spread** (``--workers 2,4``, ``--spread 20000`` tasks over ``--window`` s):
  the workers are all up, then the tasks are published with ETAs spread
  uniformly over a window starting ``lead`` seconds later; each task records
  the hostname of the worker that ran it. Also, for the largest worker count,
  a scale-out run: only the first worker is up while the schedule is
  published, the others start after it received everything and before the
  first ETA. Per worker: tasks run, and the most ETA tasks it held in memory
  at once (Celery's prefetch count, sampled every second with ``inspect
  stats``, less its value before the publish).
* **lateness** (``--rate`` tasks per second for ``--seconds``, each with a
  ``--countdown``, so that as many come due per second): one worker of each
  ``--pool`` (default ``prefork:2,threads:4``: a prefork worker on 2 cores
  does not run 1,000 tasks/s in every configuration), p50/p99/max from the
  ETA to the start in the worker, the due rate achieved by the sender, the
  rate the worker started them at, and CPU per task (the worker, Redis).
  Runs ``--rounds`` times (default 2, alternating the configurations) with
  the load average of each.

Results are printed as markdown tables at the end (progress lines before them).
"""
from __future__ import annotations

import argparse
import datetime
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ''):   # ``python benchmarks/delayed_delivery.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = 'benchmarks'

from benchmarks import common  # noqa: E402
from benchmarks.celery_workloads import Workers, delete_queues, make_app  # noqa: E402
from benchmarks.common import (KOMBU_REDIS, STREAMS, Broker, RedisServer, percentile,  # noqa: E402
                               wait_until)

RUN = 'benchmarks.celery_app.eta_run'
NOOP = 'benchmarks.celery_app.noop'
PARTS = ('memory', 'spread', 'lateness')
PUBLISH_N = 5000          # tasks sent one by one to time a publish
HELD_FROM, HELD_TO = 300, 3600   # countdowns of the held tasks: 5 minutes to 1 hour (none comes due
                                # while a worker reads 100,000: kombu redis takes about 2 minutes)
SPREAD_LEAD = 12.0        # seconds from the start of the publish to the first ETA (all up)
SCALE_OUT_LEAD = 10.0, 0.0015   # the same, scale-out run: seconds + seconds per task (40 s for
                                # 20,000): the publish, the first worker reading them all and the
                                # others starting all happen before the first ETA


@dataclass
class Config:
    label: str
    broker: Broker
    options: dict = field(default_factory=dict)

    @property
    def kind(self):
        if self.broker.name == KOMBU_REDIS:
            return 'kombu'
        return 'on' if self.options.get('delayed_delivery', True) else 'off'


class PoolWorkers(Workers):
    """:class:`~benchmarks.celery_workloads.Workers` with a choice of pool and concurrency."""

    def __init__(self, broker, count, queue, key, options=None, pool='prefork', concurrency=2):
        super().__init__(broker, count, queue, key, options=options)
        self.pool, self.concurrency = pool, concurrency

    def start(self, app, timeout=60, only=None):
        """Start the workers (``only``: those indexes), wait until they answer ``ping``."""
        names = [self.names[i] for i in (only if only is not None else range(len(self.names)))]
        for name in names:
            log = open(self.dir / (name.split('@')[0] + '.log'), 'ab')
            command = [sys.executable, '-m', 'celery', '-A', 'benchmarks.celery_app', 'worker',
                       '-P', self.pool, '-l', 'WARNING', '-n', name, '-Q', self.queue,
                       '--without-gossip', '--without-mingle', '--without-heartbeat']
            if self.pool != 'solo':
                command += ['-c', str(self.concurrency)]
            self.procs.append(subprocess.Popen(
                command, env=self.env, cwd=common.CODE_DIR, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            replies = app.control.ping(destination=names, timeout=0.5)
            if len(replies) == len(names):
                return self
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError('workers not ready; log tail: %s' % self.log_tail())

    def prefetch(self, app, timeout=1.0):
        """{worker name: Celery's current prefetch count} of those that answered."""
        replies = app.control.inspect(destination=self.names, timeout=timeout,
                                      limit=len(self.procs)).stats() or {}
        return {name: int(stats.get('prefetch_count') or 0) for name, stats in replies.items()
                if isinstance(stats, dict)}

    def describe(self):
        return '-P %s%s' % (self.pool, '' if self.pool == 'solo' else ' -c %d' % self.concurrency)


def parse_pool(text):
    pool, _, concurrency = text.partition(':')
    return pool, int(concurrency or 1)


def rss_kb(pid: int) -> int:
    with open('/proc/%d/status' % pid) as status:
        for line in status:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    return 0


def cpu_s(pgid: int) -> tuple[float, float]:
    """CPU seconds (user+sys) so far of process ``pgid`` and of its whole process group."""
    tick = os.sysconf('SC_CLK_TCK')
    main = group = 0.0
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % entry) as stat:
                fields = stat.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:   # pgrp
            used = (int(fields[11]) + int(fields[12])) / tick   # utime, stime
            group += used
            if int(entry) == pgid:
                main = used
    return main, group


def loadavg():
    return '%.2f' % os.getloadavg()[0]


def streams_key(queue):
    return 'celery-streams:q:{%s}' % queue


def wait_progress(count, target, stall_s, timeout, interval=0.2, not_before=0.0):
    """Wait until ``count()`` reaches ``target``; give up after ``timeout`` s, or (past
    ``not_before`` s) once it grew by less than 1% of ``target`` in the last ``stall_s`` s:
    a stalled run reports what it got instead of holding the benchmark for an hour.
    Returns ``(count, seconds waited)``."""
    began = time.monotonic()
    marks = deque()   # (seconds, count); marks[0]: the last one at least stall_s old
    while True:
        now, value = time.monotonic() - began, count()
        if value >= target or now >= timeout:
            return value, now
        marks.append((now, value))
        while len(marks) > 1 and marks[1][0] <= now - stall_s:
            marks.popleft()
        if now >= not_before and marks[0][0] <= now - stall_s and value - marks[0][1] < target / 100:
            return value, now
        time.sleep(interval)


def held_count(cfg, client, queue):
    """How many tasks of ``queue`` are where they wait (see the module doc)."""
    if cfg.kind == 'on':
        return client.zcard(streams_key(queue) + ':scheduled')
    if cfg.kind == 'off':
        try:
            return client.xpending(streams_key(queue), 'celery')['pending']
        except Exception:   # no group yet
            return 0
    return client.hlen('unacked')


def publish_rate(cfg, n, countdowns):
    """Tasks/s of ``n`` plain ``send_task`` calls, one at a time, into a queue nobody consumes;
    with countdowns (``countdowns``: a list) or without (None)."""
    key = 'csbench-' + uuid.uuid4().hex[:10]
    queue = key + '-publish'
    app = make_app(cfg.broker, cfg.options)
    try:
        with app.producer_or_acquire() as producer:
            for _ in range(200):   # declares it, warms up the connection and the scripts
                app.send_task(NOOP, queue=queue, producer=producer,
                              countdown=HELD_TO if countdowns else None)
            began = time.perf_counter()
            for i in range(n):
                app.send_task(NOOP, queue=queue, producer=producer,
                              countdown=countdowns[i] if countdowns else None)
            return n / (time.perf_counter() - began)
    finally:
        delete_queues(app, queue)
        app.close()


def run_memory(cfg, held, log):
    """Worker RSS and Redis memory with ``held`` tasks 5 min to 1 h ahead."""
    rng = random.Random(13)
    countdowns = [rng.uniform(HELD_FROM, HELD_TO) for _ in range(max(held, PUBLISH_N))]
    result = {'publish_scheduled': publish_rate(cfg, PUBLISH_N, countdowns),
              'publish_plain': publish_rate(cfg, PUBLISH_N, None)}
    log('   publish one by one: %.0f tasks/s with countdowns, %.0f without'
        % (result['publish_scheduled'], result['publish_plain']))
    cfg.broker.reset()
    key = 'csbench-' + uuid.uuid4().hex[:10]
    queue = key + '-tasks'
    app = make_app(cfg.broker, cfg.options)
    client = cfg.broker.server.client()
    group = PoolWorkers(cfg.broker, 1, queue, key, options=cfg.options)
    try:
        group.start(app)
        pid = group.procs[0].pid
        time.sleep(2.0)
        rss0, mem0 = rss_kb(pid), cfg.broker.server.used_memory()
        began = time.monotonic()
        with app.producer_or_acquire() as producer, producer.batch(max_size=1000):
            for i in range(held):
                app.send_task(NOOP, queue=queue, producer=producer, countdown=countdowns[i])
        published = time.monotonic() - began
        got, _ = wait_progress(lambda: held_count(cfg, client, queue), held, stall_s=30,
                               timeout=900, not_before=30)
        in_place = time.monotonic() - began
        if got < held:
            log('   STALLED: %d of %d in place after %.0f s' % (got, held, in_place))
        # the worker files the last ones in its timer: wait until its RSS stops moving
        last, steady, deadline = rss_kb(pid), 0, time.monotonic() + 60
        while steady < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
            now = rss_kb(pid)
            steady = steady + 1 if abs(now - last) < 256 else 0
            last = now
        rss1, mem1 = rss_kb(pid), cfg.broker.server.used_memory()
        result.update({
            'held': held, 'published_s': published, 'in_place_s': in_place, 'in_place': got,
            'rss_before_mb': rss0 / 1024, 'rss_after_mb': rss1 / 1024,
            'rss_per_task_kb': (rss1 - rss0) / max(got, 1),
            'redis_before_mb': mem0 / 2**20, 'redis_after_mb': mem1 / 2**20,
            'redis_per_task_b': (mem1 - mem0) / held,
            'ran': int(cfg.broker.counter().get(key + ':done') or 0),
            'load': loadavg()})
        return result
    finally:
        group.stop()
        delete_queues(app, queue)
        app.close()


def run_spread(cfg, workers, tasks, window, scale_out, log):
    """Which worker runs the tasks of a schedule coming due over ``window`` seconds."""
    key = 'csbench-' + uuid.uuid4().hex[:10]
    queue = key + '-tasks'
    app = make_app(cfg.broker, cfg.options)
    client = cfg.broker.server.client()
    counter = cfg.broker.counter()
    group = PoolWorkers(cfg.broker, workers, queue, key, options=cfg.options)
    try:
        group.start(app, only=[0] if scale_out else None)
        base = {}
        for _ in range(5):
            base = group.prefetch(app)
            if len(base) == len(group.procs):
                break
        lead = SCALE_OUT_LEAD[0] + SCALE_OUT_LEAD[1] * tasks if scale_out else SPREAD_LEAD
        began = time.time()
        first_eta = began + lead
        rng = random.Random(7)
        etas = sorted(first_eta + rng.uniform(0, window) for _ in range(tasks))
        rng.shuffle(etas)
        with app.producer_or_acquire() as producer, producer.batch(max_size=1000):
            for eta in etas:
                app.send_task(RUN, queue=queue, producer=producer,
                              eta=datetime.datetime.fromtimestamp(eta, datetime.timezone.utc))
        published = time.time() - began
        joined = first_held = None
        if scale_out:
            first_held, _ = wait_progress(lambda: held_count(cfg, client, queue), tasks, stall_s=10,
                                          timeout=lead - 10 - published, interval=0.1, not_before=5)
            log('   %d of %d in place after %.1f s; starting %d more workers'
                % (first_held, tasks, time.time() - began, workers - 1))
            group.start(app, only=range(1, workers))
            joined = time.time() - began
            for name, value in group.prefetch(app).items():
                base.setdefault(name, value)
        peak = {name: 0 for name in group.names}
        redis0 = cfg.broker.server.snapshot()
        deadline = began + lead + window + 300
        marks = deque()   # (time, tasks run) of the last 20 s
        while True:
            ran, now = int(counter.llen(key + ':lateness')), time.time()
            if ran >= tasks or now > deadline:
                break
            marks.append((now, ran))
            while len(marks) > 1 and marks[1][0] <= now - 20:
                marks.popleft()
            if now > first_eta + window + 10 and marks[0][0] <= now - 20 and ran - marks[0][1] < tasks / 100:
                break   # stalled: report what ran
            for name, value in group.prefetch(app).items():
                if name in base:
                    peak[name] = max(peak[name], value - base[name])
            time.sleep(0.5)
        if ran < tasks:
            log('   STALLED: %d of %d ran after %.0f s' % (ran, tasks, time.time() - began))
        work = cfg.broker.server.work_since(redis0, max(ran, 1))
        hosts = {k.decode(): int(v) for k, v in counter.hgetall(key + ':hosts').items()}
        samples = [float(v) * 1000 for v in counter.lrange(key + ':lateness', 0, -1)]
        started = sorted(float(v) for v in counter.lrange(key + ':started', 0, -1))
        return {'tasks': tasks, 'workers': workers, 'scale_out': scale_out,
                'run_rate': (len(started) - 1) / max(started[-1] - started[0], 1e-9),
                'published_s': published, 'joined_s': joined, 'lead_s': lead,
                'first_held': first_held, 'ran_total': ran,
                'ran': [hosts.get(name, 0) for name in group.names],
                'held_peak': [peak[name] for name in group.names],
                'p50_ms': percentile(samples, 50), 'p99_ms': percentile(samples, 99),
                'max_ms': max(samples), 'load': loadavg(), 'redis_cpu_us': work['cpu_us'],
                'promotes': work['cmds'].get('zrangebyscore', 0.0), 'cmds': work['cmds']}
    finally:
        group.stop()
        delete_queues(app, queue)
        app.close()


def run_lateness(cfg, rate, seconds, countdown, pool):
    """ETA-to-start lateness of countdown tasks coming due at ``rate`` per second."""
    key = 'csbench-' + uuid.uuid4().hex[:10]
    queue = key + '-tasks'
    app = make_app(cfg.broker, cfg.options)
    counter = cfg.broker.counter()
    pool_name, concurrency = pool
    group = PoolWorkers(cfg.broker, 1, queue, key, options=cfg.options, pool=pool_name,
                        concurrency=concurrency)
    try:
        group.start(app)
        load = loadavg()
        total = int(rate * seconds)
        with app.producer_or_acquire() as producer:
            for _ in range(20):   # warm up the pool and its connections
                app.send_task(NOOP, queue=queue, producer=producer)
            wait_until(lambda: int(counter.get(key + ':done') or 0) >= 20, 30, what='warm-up tasks')
            cpu0, redis0 = cpu_s(group.procs[0].pid), cfg.broker.server.snapshot()
            start = time.monotonic()
            for i in range(total):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                app.send_task(RUN, queue=queue, producer=producer, countdown=countdown)
            sent_in = time.monotonic() - start
        ran, _ = wait_progress(lambda: counter.llen(key + ':lateness'), total, stall_s=20,
                               timeout=countdown + 300, interval=0.05, not_before=countdown + 10)
        cpu1, work = cpu_s(group.procs[0].pid), cfg.broker.server.work_since(redis0, max(ran, 1))
        samples = [float(v) * 1000 for v in counter.lrange(key + ':lateness', 0, -1)]
        started = sorted(float(v) for v in counter.lrange(key + ':started', 0, -1))
        due_rate = (total - 1) / sent_in   # a fixed countdown: they come due as they were sent
        run_rate = (len(started) - 1) / max(started[-1] - started[0], 1e-9)
        return {'tasks': total, 'ran': ran, 'pool': group.describe(), 'due_rate': due_rate,
                'run_rate': run_rate,
                'kept_up': ran >= total and run_rate >= 0.97 * due_rate and percentile(samples, 99) < 1000,
                'p50_ms': percentile(samples, 50), 'p99_ms': percentile(samples, 99),
                'max_ms': max(samples), 'load': load, 'load_end': loadavg(),
                'main_cpu_us': (cpu1[0] - cpu0[0]) * 1e6 / max(ran, 1),
                'worker_cpu_us': (cpu1[1] - cpu0[1]) * 1e6 / max(ran, 1),
                'redis_cpu_us': work['cpu_us'], 'promotes': work['cmds'].get('zrangebyscore', 0.0),
                'script_exists': work['cmds'].get('script|exists', 0.0), 'cmds': work['cmds']}
    finally:
        group.stop()
        delete_queues(app, queue)
        app.close()


# -- the report ---------------------------------------------------------------------------

def mb(value):
    return '{:,.0f} MB'.format(value) if value >= 10 else '{:,.1f} MB'.format(value)


def ms(value):
    return '{:,.0f} ms'.format(value) if value >= 100 else '%.1f ms' % value


def report_memory(rows, held):
    print('### {:,} countdowns held: publish rate, worker RSS, Redis memory\n'.format(held))
    print('Publish: %s plain `send_task` calls one at a time into a queue nobody consumes, with '
          'countdowns (5 min to 1 h) and without. Held: %s tasks with countdowns spread uniformly '
          'from 5 minutes to 1 hour ahead, `send_task` in `Producer.batch(max_size=1000)`, one idle '
          '`celery worker -P prefork -c 2`; "in place": on: all in the schedule (`ZCARD`), off: all '
          'in the worker (the group\'s PEL), kombu redis: all reserved by the worker '
          '(`HLEN unacked`). RSS: the worker\'s main process, after it stopped growing.\n'
          % ('{:,}'.format(PUBLISH_N), '{:,}'.format(held)))
    print('| transport | publish with countdown | publish without | held: published in | all in '
          'place after | worker RSS before → after | per task | Redis `used_memory` before → '
          'after | per task | load avg |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for cfg, r in rows:
        in_place = ('%.1f s' % r['in_place_s'] if r['in_place'] >= r['held'] else
                    '**stalled: {:,} of {:,} after {:.0f} s**'.format(r['in_place'], r['held'],
                                                                      r['in_place_s']))
        print('| %s | {:,.0f} tasks/s | {:,.0f} tasks/s | %.1f s | %s | %s → %s | %+.1f KB | '
              '%s → %s | {:,.0f} B | %s |'.format(r['publish_scheduled'], r['publish_plain'],
                                                  r['redis_per_task_b'])
              % (cfg.label, r['published_s'], in_place, mb(r['rss_before_mb']),
                 mb(r['rss_after_mb']), r['rss_per_task_kb'], mb(r['redis_before_mb']),
                 mb(r['redis_after_mb']), r['load']))
    print()


def report_spread(rows, tasks, window):
    print('### A schedule of {:,} tasks coming due over {:.0f} s: who runs them\n'.format(tasks, window))
    print('`celery worker -P prefork -c 2` each. "all up": every worker answers `ping` before the '
          'publish (`Producer.batch`), the first ETA %.0f s after its start; "scale-out": only '
          'worker 1 is up during the publish, the others start once it has them all and before '
          'the first ETA ({:.0f} s). Held: the most ETA tasks a worker held in memory at once '
          '(Celery\'s prefetch count above its idle value, `inspect stats` about every second). '
          'Run rate: tasks / (last start - first start), against {:,.0f} coming due a second. '
          'Lateness: ETA to start. Redis CPU: server CPU from the end of the publish to the last '
          'task, per task (the tasks\' own counter writes and the `inspect` sampling included); '
          'promotes: `promote` script calls per task.\n'.format(SCALE_OUT_LEAD[0] + SCALE_OUT_LEAD[1] * tasks,
                                                                 tasks / window)
          % SPREAD_LEAD)
    print('| transport | workers | tasks run by worker 1 / 2 / ... | busiest | '
          'held at most by worker 1 / 2 / ... | run rate | lateness p50 | p99 | max | Redis CPU | '
          'promotes | load avg |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|')
    for cfg, r in rows:
        share = max(r['ran']) / max(sum(r['ran']), 1)
        ran = ' / '.join('{:,}'.format(n) for n in r['ran'])
        if r['ran_total'] < r['tasks']:
            ran += ' (**stalled: {:,} of {:,} ran**)'.format(r['ran_total'], r['tasks'])
        if r['scale_out'] and r['first_held'] < r['tasks']:
            ran += ' (worker 1 had {:,} when the others started)'.format(r['first_held'])
        print('| %s | %d, %s | %s | %.0f%% | %s | {:,.0f}/s | %s | %s | %s | %.0f µs | %s | %s |'.format(
            r['run_rate']) % (
            cfg.label, r['workers'], 'scale-out' if r['scale_out'] else 'all up', ran, share * 100,
            ' / '.join('{:,}'.format(n) for n in r['held_peak']),
            ms(r['p50_ms']), ms(r['p99_ms']), ms(r['max_ms']), r['redis_cpu_us'],
            '%.2f' % r['promotes'] if cfg.kind == 'on' else '-', r['load']))
    print()


def report_lateness(rows, rate, seconds, countdown):
    print('### Lateness at {:,.0f} tasks/s coming due\n'.format(rate))
    print('{:,.0f} tasks sent one by one at a steady {:,.0f}/s, each with a {:g} s countdown, to one '
          'idle worker; lateness: from the ETA (`request.eta`) to the start of the task in the '
          'worker. Due rate: what the sender achieved (a fixed countdown: they come due as they '
          'were sent); run rate: tasks / (last start - first start); kept up: run rate at least '
          '97% of the due rate and p99 under 1 s. Worker CPU per task: its main process / with its '
          'pool processes; Redis CPU per task (the task\'s own counter writes included); '
          'promotes and `SCRIPT EXISTS` calls per task.\n'.format(rate * seconds, rate, countdown))
    print('| round | transport | worker | due rate | run rate | kept up | p50 | p99 | max | '
          'worker CPU | Redis CPU | promotes, `SCRIPT EXISTS` | load avg (start, end) |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|---|')
    for rnd, cfg, r in rows:
        print('| %d | %s | `%s` | {:,.0f}/s | {:,.0f}/s | %s | %s | %s | %s | %.0f / %.0f µs | %.0f µs '
              '| %s | %s, %s |'.format(r['due_rate'], r['run_rate']) % (
                  rnd, cfg.label, r['pool'], 'yes' if r['kept_up'] else '**no**' + (
                      '' if r['ran'] >= r['tasks'] else
                      ' (stalled: {:,} of {:,} ran)'.format(r['ran'], r['tasks'])), ms(r['p50_ms']),
                  ms(r['p99_ms']), ms(r['max_ms']), r['main_cpu_us'], r['worker_cpu_us'],
                  r['redis_cpu_us'],
                  '%.2f, %.2f' % (r['promotes'], r['script_exists']) if cfg.kind == 'on' else '-',
                  r['load'], r['load_end']))
    print()


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m benchmarks delayed-delivery',
                                     description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true',
                        help='small sizes (10,000 held, 4,000 spread over 10 s, 3 s of lateness, '
                        '2 workers, 1 round)')
    parser.add_argument('--only', default=','.join(PARTS), help='parts among: %s' % ', '.join(PARTS))
    parser.add_argument('--configs', default='on,off,kombu', help='among: on, off, kombu')
    parser.add_argument('--held', type=int, help='tasks held (memory; default 100000)')
    parser.add_argument('--workers', help='worker counts (spread; default 2,4)')
    parser.add_argument('--spread', type=int, help='tasks of the schedule (spread; default 20000)')
    parser.add_argument('--window', type=float, help='seconds they come due over (spread; default 20)')
    parser.add_argument('--rate', type=float, default=1000, help='tasks due per second (lateness)')
    parser.add_argument('--seconds', type=float, help='seconds of sending (lateness; default 10)')
    parser.add_argument('--countdown', type=float, default=5, help='countdown of each (lateness)')
    parser.add_argument('--pool', default='prefork:2,threads:4',
                        help='the lateness worker\'s pool[:concurrency], comma-separated: each is '
                        'run (default prefork:2,threads:4)')
    parser.add_argument('--rounds', type=int, help='rounds of lateness (default 2; quick 1)')
    parser.add_argument('--live-sources', action='store_true',
                        help='import celery_streams from the work tree instead of a copy')
    parser.add_argument('--server', default=None, help='redis-server binary')
    args = parser.parse_args(argv)
    quick = args.quick
    held = args.held or (10_000 if quick else 100_000)
    counts = [int(n) for n in (args.workers or ('2' if quick else '2,4')).split(',')]
    spread = args.spread or (4_000 if quick else 20_000)
    window = args.window or (10.0 if quick else 20.0)
    seconds = args.seconds or (3.0 if quick else 10.0)
    rounds = args.rounds or (1 if quick else 2)
    pools = [parse_pool(text) for text in args.pool.split(',')]
    only = set(args.only.split(','))
    if only - set(PARTS):
        parser.error('unknown part(s): %s' % ', '.join(sorted(only - set(PARTS))))

    def terminate(signum, frame):   # SIGTERM ends the run through the finally blocks
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    if not args.live_sources:
        common.snapshot_sources()
    import celery
    import kombu

    import celery_streams  # noqa: F401  registers redis-streams://
    digest = common.sources_digest()
    server = RedisServer(args.server).start()
    streams = Broker(STREAMS, 'redis-streams://127.0.0.1:%d/0' % server.port, server)
    kombu_redis = Broker(KOMBU_REDIS, server.url(0), server)
    configs = {'on': Config('celery_streams, delayed_delivery on', streams, {'delayed_delivery': True}),
               'off': Config('celery_streams, delayed_delivery off', streams, {'delayed_delivery': False}),
               'kombu': Config('kombu redis', kombu_redis, {})}
    configs = [configs[name] for name in args.configs.split(',')]
    began = time.monotonic()

    def log(text):
        print('[%4.0fs] %s' % (time.monotonic() - began, text), flush=True)

    memory, spreads, late = [], [], []
    try:
        log('Delayed delivery, %s, Redis %s, celery %s, kombu %s, %d cores, load average %s'
            % (datetime.datetime.now().strftime('%Y-%m-%d %H:%M'), server.version(),
               celery.__version__, kombu.__version__, os.cpu_count(), loadavg()))
        if 'memory' in only:
            for cfg in configs:
                server.flush()
                log('== memory: %s, %d held (load %s)' % (cfg.label, held, loadavg()))
                try:
                    memory.append((cfg, run_memory(cfg, held, log)))
                    log('   %s' % common.fmt(memory[-1][1]))
                except Exception as exc:   # one failed run must not end the benchmark
                    log('   FAILED: %s: %s' % (type(exc).__name__, exc))
                server.flush()
        if 'spread' in only:
            runs = [(n, False) for n in counts] + [(max(counts), True)]
            for workers, scale_out in runs:
                for cfg in configs:
                    server.flush()
                    log('== spread: %s, %d workers%s, %d tasks over %.0f s (load %s)'
                        % (cfg.label, workers, ', scale-out' if scale_out else '', spread, window,
                           loadavg()))
                    try:
                        spreads.append((cfg, run_spread(cfg, workers, spread, window, scale_out, log)))
                        log('   %s' % common.fmt(spreads[-1][1]))
                    except Exception as exc:
                        log('   FAILED: %s: %s' % (type(exc).__name__, exc))
                    server.flush()
        if 'lateness' in only:
            for rnd in range(1, rounds + 1):
                for pool in pools:
                    for cfg in configs:
                        server.flush()
                        log('== lateness round %d: %s, -P %s, %.0f/s for %.0f s, countdown %g s '
                            '(load %s)' % (rnd, cfg.label, ':'.join(map(str, pool)), args.rate,
                                           seconds, args.countdown, loadavg()))
                        try:
                            late.append((rnd, cfg, run_lateness(cfg, args.rate, seconds,
                                                                args.countdown, pool)))
                            log('   %s' % common.fmt(late[-1][2]))
                        except Exception as exc:
                            log('   FAILED: %s: %s' % (type(exc).__name__, exc))
                        server.flush()
    finally:
        version = server.version()
        server.stop()
        if common.CODE_DIR != common.ROOT:
            shutil.rmtree(common.CODE_DIR, ignore_errors=True)
        print()
        print('## Delayed delivery: %s, Redis %s (private, no persistence), celery %s, kombu %s, '
              '%d cores, celery_streams sources sha256 %s\n'
              % (datetime.datetime.now().strftime('%Y-%m-%d %H:%M'), version, celery.__version__,
                 kombu.__version__, os.cpu_count(), digest))
        if memory:
            report_memory(memory, held)
        if spreads:
            report_spread(spreads, spread, window)
        if late:
            report_lateness(late, args.rate, seconds, args.countdown)
        print('Total %.0f s; load average (1, 5, 15 min) at the end: %s.'
              % (time.monotonic() - began, ', '.join('%.2f' % v for v in os.getloadavg())))
    return 0


if __name__ == '__main__':
    sys.exit(main())
