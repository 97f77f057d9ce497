"""Delayed delivery: how late countdown tasks start, and what holding them costs a worker:
``python -m benchmarks delayed-delivery [--rate 50] [--seconds 20] [--held 20000]``.

Not part of CI. It starts a private ``redis-server`` (no persistence) and, for
``delayed_delivery`` on (countdowns wait in Redis) and off (the worker holds them
in memory, Celery's timer runs them), one real ``celery worker -P prefork -c 2``
(:mod:`benchmarks.celery_app`, ``--without-gossip --without-mingle --without-heartbeat``):

* **lateness**: tasks sent at a steady ``--rate`` for ``--seconds``, each with a
  countdown of ``--countdown`` seconds, so that as many come due per second;
  each records the seconds from its ETA (``request.eta``) to its start. p50,
  p99 and max.
* **memory**: ``--held`` tasks with a countdown of an hour sent to an idle
  worker (publish batches of 1,000); once they are all where they wait (the
  schedule: ``ZCARD``; in the worker: the group's PEL), the worker's main
  process RSS (``VmRSS``) and the server's ``used_memory``, each against its
  value before the publish.

Results are printed as markdown.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import uuid
from pathlib import Path

if __package__ in (None, ''):   # ``python benchmarks/delayed_delivery.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = 'benchmarks'

from benchmarks import common  # noqa: E402
from benchmarks.celery_workloads import Workers, delete_queues, make_app  # noqa: E402
from benchmarks.common import STREAMS, Broker, RedisServer, percentile, wait_until  # noqa: E402

LATENESS = 'benchmarks.celery_app.eta_lateness'
NOOP = 'benchmarks.celery_app.noop'


def rss_kb(pid: int) -> int:
    with open('/proc/%d/status' % pid) as status:
        for line in status:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    return 0


def run_lateness(broker, delayed, rate, seconds, countdown):
    """ETA-to-start lateness of countdown tasks coming due at ``rate`` per second."""
    key = 'csbench-' + uuid.uuid4().hex[:10]
    queue = key + '-tasks'
    options = {'delayed_delivery': delayed}
    app = make_app(broker, options)
    counter = broker.counter()
    group = Workers(broker, 1, queue, key, options=options)
    try:
        group.start(app)
        total = int(rate * seconds)
        with app.producer_or_acquire() as producer:
            start = time.monotonic()
            for i in range(total):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                app.send_task(LATENESS, queue=queue, producer=producer, countdown=countdown)
        wait_until(lambda: counter.llen(key + ':lateness') >= total, countdown + 60, interval=0.05,
                   what='lateness tasks')
        samples = [float(v) * 1000 for v in counter.lrange(key + ':lateness', 0, -1)]
        return {'tasks': total, 'p50_ms': percentile(samples, 50), 'p99_ms': percentile(samples, 99),
                'max_ms': max(samples), 'min_ms': min(samples)}
    finally:
        group.stop()
        delete_queues(app, queue)
        app.close()


def run_memory(broker, delayed, held):
    """Worker RSS and Redis memory with ``held`` tasks an hour ahead."""
    key = 'csbench-' + uuid.uuid4().hex[:10]
    queue = key + '-tasks'
    options = {'delayed_delivery': delayed}
    app = make_app(broker, options)
    client = broker.server.client()
    keys_prefix = 'celery-streams:q:{%s}' % queue
    group = Workers(broker, 1, queue, key, options=options)
    try:
        group.start(app)
        pid = group.procs[0].pid
        time.sleep(1.0)
        rss0, mem0 = rss_kb(pid), broker.server.used_memory()
        began = time.monotonic()
        with app.producer_or_acquire() as producer, producer.batch(max_size=1000):
            for _ in range(held):
                app.send_task(NOOP, queue=queue, producer=producer, countdown=3600)
        if delayed:
            wait_until(lambda: client.zcard(keys_prefix + ':scheduled') >= held, 120, interval=0.1,
                       what='%d scheduled' % held)
        else:
            wait_until(lambda: client.xpending(keys_prefix, 'celery')['pending'] >= held, 600,
                       interval=0.2, what='%d held by the worker' % held)
        settled = time.monotonic() - began
        time.sleep(2.0)   # the worker files the last ones in its timer
        return {'held': held, 'settled_s': settled,
                'worker_rss_mb': rss_kb(pid) / 1024, 'worker_rss_delta_mb': (rss_kb(pid) - rss0) / 1024,
                'worker_rss_before_mb': rss0 / 1024,
                'redis_delta_mb': (broker.server.used_memory() - mem0) / 1024 / 1024,
                'in_stream': client.xlen(keys_prefix),
                'scheduled': client.zcard(keys_prefix + ':scheduled')}
    finally:
        group.stop()
        delete_queues(app, queue)
        client.delete(keys_prefix + ':scheduled')
        app.close()


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m benchmarks delayed-delivery')
    parser.add_argument('--rate', type=float, default=50, help='countdown tasks due per second')
    parser.add_argument('--seconds', type=float, default=20, help='seconds of sending')
    parser.add_argument('--countdown', type=float, default=3, help='countdown of each task')
    parser.add_argument('--held', type=int, default=20000, help='tasks an hour ahead (memory)')
    parser.add_argument('--server', default=None, help='redis-server binary')
    args = parser.parse_args(argv)
    import celery_streams  # noqa: F401  registers redis-streams://
    server = RedisServer(args.server).start()
    broker = Broker(STREAMS, 'redis-streams://127.0.0.1:%d/0' % server.port, server)
    rows = []
    try:
        print('# Delayed delivery, %s, Redis %s, load average %.2f'
              % (datetime.datetime.now().strftime('%Y-%m-%d %H:%M'), server.version(),
                 os.getloadavg()[0]), flush=True)
        for delayed in (True, False):
            late = run_lateness(broker, delayed, args.rate, args.seconds, args.countdown)
            print('lateness delayed_delivery=%s: %s' % (delayed, common.fmt(late)), flush=True)
            memory = run_memory(broker, delayed, args.held)
            print('memory delayed_delivery=%s: %s' % (delayed, common.fmt(memory)), flush=True)
            rows.append((delayed, late, memory))
    finally:
        server.stop()
    print()
    print('| delayed_delivery | lateness p50 | p99 | max | worker RSS, %d held | RSS growth | '
          'Redis growth | settled in |' % args.held)
    print('|---|---|---|---|---|---|---|---|')
    for delayed, late, memory in rows:
        print('| %s | %.1f ms | %.1f ms | %.1f ms | %.0f MB | %+.1f MB | %+.1f MB | %.1f s |' % (
            'on' if delayed else 'off', late['p50_ms'], late['p99_ms'], late['max_ms'],
            memory['worker_rss_mb'], memory['worker_rss_delta_mb'], memory['redis_delta_mb'],
            memory['settled_s']))
    print('\nload average at the end: %.2f' % os.getloadavg()[0])
    return 0


if __name__ == '__main__':
    sys.exit(main())
