"""Celery end to end: throughput of a no-op task, enqueue-to-start latency, 1-4 workers.

Workers are real ``celery worker -P prefork -c 2`` subprocesses running
:mod:`benchmarks.celery_app`. Completions are counted in the private Redis
(there is no result backend).

Throughput: the workers start on an idle queue and answer ``ping``; then N
tasks are sent to a fresh queue and ``add_consumer`` makes every worker consume
it. The rate is N / (end of the last task - start of the first task).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from celery import Celery
from kombu import Exchange, Queue

from . import common
from .common import KOMBU_REDIS, STREAMS, percentile, wait_until

CONCURRENCY = 2
NOOP, LATENCY = 'benchmarks.celery_app.noop', 'benchmarks.celery_app.latency'
#: The Redis transports block a read on the idle queue for up to their polling
#: interval before they see the queue added by add_consumer: shorten it so all
#: workers join the backlog within 0.1 s (it changes nothing under load).
#: (kombu's Redis transport takes its BRPOP timeout from polling_interval.)
JOIN_OPTIONS = {STREAMS: {'polling_interval': 0.1}, KOMBU_REDIS: {'polling_interval': 0.1}}


class Workers:
    """``count`` celery worker subprocesses for one run, logs in a temp dir."""

    def __init__(self, broker, count, queue, key, target=0, acks_late=False, options=None):
        self.dir = Path(tempfile.mkdtemp(prefix='cs-bench-worker-'))
        self.names = ['bench%d-%s@%s' % (i, key[-6:], os.uname().nodename) for i in range(count)]
        self.queue = queue
        self.env = dict(os.environ, BENCH_BROKER=broker.url, BENCH_KEY=key, BENCH_TARGET=str(target),
                        BENCH_ACKS_LATE='1' if acks_late else '0',
                        BENCH_REDIS=broker.counter_url,
                        BENCH_TRANSPORT_OPTIONS=json.dumps(options or {}),
                        PYTHONPATH=str(common.CODE_DIR) + os.pathsep + os.environ.get('PYTHONPATH', ''))
        self.procs = []

    def start(self, app, timeout=60):
        for name in self.names:
            log = open(self.dir / (name.split('@')[0] + '.log'), 'wb')
            self.procs.append(subprocess.Popen(
                [sys.executable, '-m', 'celery', '-A', 'benchmarks.celery_app', 'worker',
                 '-P', 'prefork', '-c', str(CONCURRENCY), '-l', 'WARNING', '-n', name,
                 '-Q', self.queue, '--without-gossip', '--without-mingle', '--without-heartbeat'],
                env=self.env, cwd=common.CODE_DIR, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
            log.close()
        common.wait_for_workers(app, self.names, self.procs, timeout, self.log_tail)
        return self

    def log_tail(self):
        return ' | '.join(p.read_text(errors='replace')[-500:] for p in self.dir.glob('*.log'))

    def stop(self):
        """Kill the workers and their pool processes: the measured tasks are all done."""
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)   # its own session: the worker and its pool
            except ProcessLookupError:
                pass
            proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def make_app(broker, options=None):
    """A fresh client app for one run (tasks are sent by name)."""
    return Celery('csbench-client', broker=broker.url, set_as_current=False,
                  config_source={'broker_transport_options': options or {},
                                 'broker_connection_retry_on_startup': True})


def delete_queues(app, *names):
    try:
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            for name in names:
                Queue(name, Exchange(name), routing_key=name)(channel).delete()
                Exchange(name)(channel).delete()
    except Exception:
        pass


def run_send(broker, n):
    """Tasks/s of ``send_task`` one by one (no batch, no worker), timed until all are queued."""
    from .kombu_workloads import queue_size

    queue = 'csbench-%s-send' % uuid.uuid4().hex[:10]
    app = make_app(broker, broker.transport_options)
    try:
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            Queue(queue, Exchange(queue), routing_key=queue)(channel).declare()
            for _ in range(200):   # warm up: the producer pool, the scripts
                app.send_task(NOOP, queue=queue)
            began = time.perf_counter()
            for _ in range(n):
                app.send_task(NOOP, queue=queue)
            wait_until(lambda: queue_size(channel, Queue(queue)) >= n + 200, timeout=120,
                       what='%d tasks queued' % n)
            return {'rate': n / (time.perf_counter() - began)}
    finally:
        delete_queues(app, queue)
        app.close()


def run_throughput(broker, n, workers=1, acks_late=False, profile=None):
    """Tasks/s of ``workers`` prefork workers draining ``n`` queued no-op tasks.

    ``profile(pid)``, if given, starts a profiler on the first worker's main
    process once the tasks are queued and returns a function that stops it.
    """
    key = 'csbench-' + uuid.uuid4().hex[:10]
    idle, queue = key + '-idle', key + '-tasks'
    options = JOIN_OPTIONS.get(broker.name, {})
    app = make_app(broker, options)
    counter = broker.counter()
    group = Workers(broker, workers, idle, key, target=n, acks_late=acks_late, options=options)
    try:
        group.start(app)
        began = time.perf_counter()
        with app.producer_or_acquire() as producer, producer.batch(max_size=1000):
            for _ in range(n):
                app.send_task(NOOP, queue=queue, producer=producer)
        send_rate = n / (time.perf_counter() - began)
        stop_profile = profile(group.procs[0].pid) if profile else None
        before = broker.server.snapshot()
        replies = app.control.add_consumer(queue, destination=group.names, reply=True, timeout=10)
        if len(replies) != workers:
            raise RuntimeError('add_consumer answered by %d of %d workers' % (len(replies), workers))
        wait_until(lambda: counter.exists(key + ':last'), timeout=300, interval=0.02,
                   what='%d tasks done (%s so far)' % (n, counter.get(key + ':done')))
        work = broker.server.work_since(before, n)   # the task's own SET NX/INCR/SET included
        if stop_profile:
            stop_profile()
        first, last = float(counter.get(key + ':first')), float(counter.get(key + ':last'))
        return {'rate': (n - 1) / (last - first), 'send_rate': send_rate, **work}
    finally:
        group.stop()
        delete_queues(app, idle, queue)
        app.close()


def run_latency(broker, rate, seconds):
    """Enqueue-to-start latency at ``rate`` tasks/s for ``seconds``: p50, p99 and max in ms."""
    key = 'csbench-' + uuid.uuid4().hex[:10]
    queue = key + '-tasks'
    app = make_app(broker)
    counter = broker.counter()
    group = Workers(broker, 1, queue, key)
    try:
        group.start(app)
        with app.producer_or_acquire() as producer:
            for _ in range(20):   # warm up the pool processes and connections
                app.send_task(LATENCY, (time.time(),), queue=queue, producer=producer)
            wait_until(lambda: counter.llen(key + ':latency') >= 20, 30, what='warm-up tasks')
            counter.delete(key + ':latency')
            total = int(rate * seconds)
            start = time.monotonic()
            for i in range(total):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                app.send_task(LATENCY, (time.time(),), queue=queue, producer=producer)
        wait_until(lambda: counter.llen(key + ':latency') >= total, 60, interval=0.02,
                   what='latency tasks')
        samples = [float(v) * 1000 for v in counter.lrange(key + ':latency', 0, -1)]
        return {'p50_ms': percentile(samples, 50), 'p99_ms': percentile(samples, 99),
                'max_ms': max(samples)}
    finally:
        group.stop()
        delete_queues(app, queue)
        app.close()
