"""Shared helpers: a private Redis, the three brokers, timing and statistics."""
from __future__ import annotations

import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from kombu import Connection

ROOT = Path(__file__).resolve().parent.parent
#: Where the measured code is imported from (see :func:`snapshot_sources`).
CODE_DIR = ROOT
RABBIT_URL = os.environ.get('BENCH_RABBIT_URL', 'amqp://guest:guest@127.0.0.1:5672//')
BODY_SIZE = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


class RedisServer:
    """A throw-away ``redis-server`` on a free loopback port, nothing on disk."""

    def __init__(self, binary=None):
        self.binary = binary or shutil.which('redis-server') or 'redis-server'
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix='cs-bench-redis-')
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [self.binary, '--port', str(self.port), '--bind', '127.0.0.1', '--save', '',
             '--appendonly', 'no', '--dir', self.dir, '--logfile', 'redis.log'],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client().ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError('redis-server did not start on port %d' % self.port) from None
                time.sleep(0.05)

    def client(self, db=0) -> redis.Redis:
        return redis.Redis(port=self.port, db=db)

    def url(self, db=0) -> str:
        return 'redis://127.0.0.1:%d/%d' % (self.port, db)

    def flush(self):
        self.client().flushall()

    def used_memory(self) -> int:
        return int(self.client().info('memory')['used_memory'])

    def snapshot(self):
        """(calls per command, server CPU seconds) so far."""
        client = self.client()
        stats = client.info('commandstats')
        cpu = client.info('cpu')
        calls = {k[len('cmdstat_'):]: v['calls'] for k, v in stats.items()}
        return calls, cpu['used_cpu_sys'] + cpu['used_cpu_user']

    def work_since(self, before, n):
        """Server work per message since ``before`` (a snapshot): CPU µs and commands."""
        (calls0, cpu0), (calls1, cpu1) = before, self.snapshot()
        per = {cmd: (count - calls0.get(cmd, 0)) / n for cmd, count in calls1.items()}
        per = {cmd: v for cmd, v in per.items() if v >= 0.005 and cmd not in ('info', 'ping')}
        return {'cpu_us': (cpu1 - cpu0) * 1e6 / n,
                'cmds': dict(sorted(per.items(), key=lambda kv: -kv[1]))}

    def version(self) -> str:
        return self.client().info('server')['redis_version']

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Broker:
    """One side of the comparison: a name and a kombu/Celery broker URL."""

    name: str
    url: str
    server: RedisServer     # the private Redis: the broker itself, or just the task counters
    on_redis: bool = True   # the broker is that Redis (flushed between runs)
    transport_options: dict = field(default_factory=dict)

    @property
    def redis(self) -> RedisServer | None:
        return self.server if self.on_redis else None

    def connection(self, **kwargs) -> Connection:
        return Connection(self.url, transport_options=self.transport_options, **kwargs)

    @property
    def counter_url(self) -> str:
        return self.server.url(15)

    def counter(self) -> redis.Redis:
        return self.server.client(15)

    def reset(self):
        if self.on_redis:
            self.server.flush()


STREAMS, KOMBU_REDIS, RABBITMQ = 'celery_streams', 'kombu redis', 'rabbitmq'
#: celery_streams with ``publish_confirm='later'``: run in the publish workloads only.
STREAMS_LATER = 'celery_streams later'


def with_confirm_later(brokers):
    """``brokers`` with celery_streams' ``publish_confirm='later'`` after celery_streams."""
    out = []
    for broker in brokers:
        out.append(broker)
        if broker.name == STREAMS:
            out.append(Broker(STREAMS_LATER, broker.url, broker.server,
                              transport_options={'publish_confirm': 'later'}))
    return out


def make_brokers(server: RedisServer, with_rabbit=True):
    """The brokers to compare, in run order, and a note for the ones skipped."""
    import celery_streams  # noqa: F401  registers redis-streams://

    brokers = [
        Broker(STREAMS, 'redis-streams://127.0.0.1:%d/0' % server.port, server),
        Broker(KOMBU_REDIS, server.url(0), server),
    ]
    note = None
    if with_rabbit:
        version = rabbit_version()
        if version:
            brokers.append(Broker(RABBITMQ, RABBIT_URL, server, on_redis=False))
        else:
            note = 'RabbitMQ not reachable at %s: skipped' % RABBIT_URL.split('@')[-1]
    else:
        note = 'RabbitMQ skipped (--no-rabbit)'
    return brokers, note


def rabbit_version():
    """The RabbitMQ server version, or None when it does not answer."""
    try:
        with Connection(RABBIT_URL, connect_timeout=2) as conn:
            conn.connect()
            props = conn.connection.server_properties
            version = props.get('version', '?')
            return version.decode() if isinstance(version, bytes) else version
    except Exception:
        return None


def body(i: int) -> dict:
    """A JSON body of about BODY_SIZE bytes."""
    return {'id': i, 'task': 'bench.noop', 'kwargs': {'user': 'u%06d' % i, 'flag': True},
            'data': 'x' * (BODY_SIZE - 90)}


def wait_until(predicate, timeout, interval=0.002, what='condition'):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError('timed out after %ss waiting for %s' % (timeout, what))
        time.sleep(interval)


def wait_for_workers(app, names, procs, timeout, log_tail):
    """Wait until every worker of ``names`` answers ``ping``; raise with ``log_tail()`` when
    one of ``procs`` exited or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while True:
        replies = app.control.ping(destination=names, timeout=0.5)
        if len(replies) == len(names):
            return
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise RuntimeError('workers not ready; log tail: %s' % log_tail())


def median(values):
    return statistics.median(values) if values else float('nan')


def percentile(values, q):
    """The q-th percentile (0..100), nearest rank."""
    values = sorted(values)
    if not values:
        return float('nan')
    rank = max(int(round(q / 100 * len(values) + 0.5)) - 1, 0)
    return values[min(rank, len(values) - 1)]


def alternate(brokers, rounds, log, run):
    """Run ``run(broker)`` for a,b,c,a,b,c,...; return {broker name: [results]}."""
    results = {b.name: [] for b in brokers}
    for r in range(rounds):
        for broker in brokers:
            broker.reset()
            try:
                value = run(broker)
            except Exception as exc:   # one failed run must not end the benchmark
                log('    %-15s round %d FAILED: %s: %s' % (broker.name, r + 1, type(exc).__name__, exc))
                continue
            results[broker.name].append(value)
            log('    %-15s round %d: %s' % (broker.name, r + 1, fmt(value)))
            broker.reset()
    return results


def fmt(value):
    if isinstance(value, dict):
        return ', '.join('%s=%s' % (k, '{%s}' % fmt(v) if isinstance(v, dict) else fmt(v))
                         for k, v in value.items())
    if isinstance(value, float):
        return '%.4g' % value if abs(value) < 100 else '%.0f' % value
    return str(value)


def snapshot_sources():
    """Copy celery_streams (and benchmarks) to a temp dir and import them from there.

    Worker and profiled subprocesses start with that dir as cwd and PYTHONPATH,
    so a whole run measures the sources as they were at its start, even while
    someone edits the work tree. Call before celery_streams is imported.
    """
    global CODE_DIR
    CODE_DIR = Path(tempfile.mkdtemp(prefix='cs-bench-src-'))
    for package in ('celery_streams', 'benchmarks'):
        shutil.copytree(ROOT / package, CODE_DIR / package,
                        ignore=shutil.ignore_patterns('__pycache__', 'results'))
    sys.path.insert(0, str(CODE_DIR))
    os.environ['PYTHONPATH'] = str(CODE_DIR) + os.pathsep + os.environ.get('PYTHONPATH', '')
    return CODE_DIR


def sources_digest(root=None) -> str:
    """A short hash of the transport's sources, to tell which code a run measured."""
    import hashlib
    digest = hashlib.sha256()
    for path in sorted(((root or CODE_DIR) / 'celery_streams').rglob('*')):
        if path.suffix in ('.py', '.lua'):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def machine_info(server: RedisServer, rabbit: str | None) -> dict:
    import amqp
    import celery
    import kombu

    cpu = '?'
    with open('/proc/cpuinfo') as f:
        for line in f:
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    with open('/proc/meminfo') as f:
        mem_kb = int(f.readline().split()[1])
    try:
        commit = subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=ROOT,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:
        commit = '?'
    return {
        'cores (nproc)': os.cpu_count(),
        'CPU': cpu,
        'RAM': '%.1f GiB' % (mem_kb / 1024 / 1024),
        'kernel': platform.release(),
        'Redis': '%s (private redis-server, no persistence)' % server.version(),
        'RabbitMQ': rabbit or 'not reachable',
        'Python': platform.python_version(),
        'celery': celery.__version__,
        'kombu': kombu.__version__,
        'redis-py': redis.__version__,
        'amqp (py-amqp)': amqp.__version__,
        'celery_streams': 'git %s, sources sha256 %s' % (commit, sources_digest()),
        'load average (1 min) at start': '%.2f' % os.getloadavg()[0],
    }
