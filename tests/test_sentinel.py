"""Redis Sentinel, for real: a master, a replica and three Sentinels on loopback
(``tests/servers.py``, :class:`~tests.servers.SentinelTopology`), real ``celery worker``
processes, real failovers.

Workers run ``tests/apps/sentinel.py``; its task records every execution into a
journal on a server outside the topology, so a failover never touches the
records. The failover tests print their figures: run with ``-s``. URL and
option errors are in ``tests/test_pure.py``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from celery import Celery
from kombu import Connection, Exchange, Producer, Queue

import celery_streams  # noqa: F401  (registers sentinel-streams://)
from celery_streams import errors
from celery_streams.keys import Keys
from tests import servers
from tests.helpers import wait_until
from tests.servers import SentinelTopology
from tests.workers import ROOT, Worker, clean_env, flower, flower_get, send_adds, stop_all

pytestmark = pytest.mark.slow


def journal_key(what, prefix):
    """The journal list of ``tests/apps/sentinel.py`` (not imported: its app would become
    this process's current app, and the in-process CLI tests would take its options)."""
    return 'sentinel:%s:%s' % (prefix, what)

APP = 'tests.apps.sentinel'
TASK = 'tests.apps.sentinel.record'
MASTER = 'cs-master'
WORKER_FLAGS = ('--without-mingle', '--without-gossip', '--without-heartbeat')
#: The client apps retry a publish for up to ~10 s (Celery's default gives up after ~0.6 s,
#: shorter than an unplanned failover).
PUBLISH_RETRY = {'max_retries': 40, 'interval_start': 0, 'interval_step': 0.1, 'interval_max': 0.25}


@pytest.fixture(scope='module')
def journal_server(preferred_server_binary):
    with servers.RedisServer(binary=preferred_server_binary.path,
                             name=preferred_server_binary.name) as server:
        yield server


@pytest.fixture
def topology(preferred_server_binary):
    with SentinelTopology(preferred_server_binary.path, master_name=MASTER) as topology:
        yield topology


class Rig:
    """A topology, a journal, a prefix, and the workers and client apps of one test."""

    def __init__(self, topology, journal_server, prefix):
        self.topology = topology
        self.journal_server = journal_server
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.journal = journal_server.client()
        self.workers, self.apps = [], []

    def worker_env(self, **extra):
        env = clean_env()
        env.update({
            'SENTINEL_BROKER': self.topology.urls(), 'SENTINEL_MASTER': MASTER,
            'SENTINEL_JOURNAL': 'redis://127.0.0.1:%d/0' % self.journal_server.port,
            'SENTINEL_PREFIX': self.prefix,
            'PYTHONPATH': str(ROOT) + os.pathsep + env.get('PYTHONPATH', ''),
            'PYTHONUNBUFFERED': '1',
        })
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def worker(self, *args, name='w1', **env):
        worker = Worker(self.worker_env(**env), *args, *WORKER_FLAGS, name=name, app=APP)
        self.workers.append(worker)
        return worker.start()

    def client_app(self, **options):
        app = Celery('sentinel-client', broker=self.topology.urls(), set_as_current=False)
        app.conf.broker_transport_options = {'global_keyprefix': self.prefix,
                                             'master_name': MASTER, **options}
        app.conf.task_ignore_result = True
        app.conf.task_publish_retry_policy = PUBLISH_RETRY
        self.apps.append(app)
        return app

    def listed(self, what):
        return [item.decode() for item in self.journal.lrange(journal_key(what, self.prefix), 0, -1)]

    def ran(self):
        return Counter(self.listed('ran'))

    def run_times(self):
        """``[(time.time() of the run, token)]`` in order."""
        return sorted((float(t), token) for token, t in (x.split() for x in self.listed('at')))

    def wait_ran(self, tokens, timeout=30):
        tokens = set(tokens)
        deadline = time.monotonic() + timeout
        while tokens - set(self.listed('ran')):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def close(self):
        stop_all(self.workers)
        for app in self.apps:
            app.close()
        self.journal.close()


@pytest.fixture
def rig(topology, journal_server, unique_name):
    rig = Rig(topology, journal_server, unique_name + ':')
    yield rig
    rig.close()


class Publisher(threading.Thread):
    """Sends a task every ``interval`` seconds until stopped; records when each publish returned."""

    def __init__(self, app, interval=0.02, seconds=0.0):
        super().__init__(daemon=True)
        self.app, self.interval, self.seconds = app, interval, seconds
        self.returned = []      # (token, time.monotonic() when the publish returned, its duration)
        self.failed = []        # (token, error)
        self.stopping = threading.Event()

    def run(self):
        n = 0
        while not self.stopping.is_set():
            token = 'p%d' % n
            n += 1
            sent = time.monotonic()
            try:
                self.app.send_task(TASK, args=(token, self.seconds))
            except Exception as exc:
                self.failed.append((token, errors.one_line(exc)))
            else:
                now = time.monotonic()
                self.returned.append((token, now, now - sent))
            self.stopping.wait(self.interval)

    def stop(self):
        self.stopping.set()
        self.join(30)

    def returned_after(self, moment):
        return [token for token, at, _ in self.returned if at > moment]

    def returned_between(self, start, end):
        return [token for token, at, _ in self.returned if start < at <= end]

    def longest(self):
        return max((took for _, _, took in self.returned), default=0.0)


def longest_gap(times, start, end):
    """The longest stretch of ``[start, end]`` (time.time()) without a run."""
    marks = [start] + [t for t in times if start < t < end] + [end]
    return max(b - a for a, b in zip(marks, marks[1:]))


# -- failover under a running worker and a steady publisher --------------------------

#: Seconds after a promotion by which every client follows the new master (its renewal
#: thread asks the Sentinels every second).
FOLLOW_WITHIN = 2.0


@pytest.mark.parametrize('how', ['sentinel-failover', 'kill-master'])
def test_worker_and_publisher_follow_a_failover(rig, report, how):
    """Every task whose publish returned after the failover completed runs; the figures
    (how long the worker ran nothing, duplicates, losses in the failover window) are printed."""
    topology = rig.topology
    worker = rig.worker('-c', '2', SENTINEL_VT=3)
    app = rig.client_app()
    publisher = Publisher(app, interval=0.04, seconds=0.05)
    publisher.start()
    wait_until(lambda: len(rig.listed('ran')) >= 20, timeout=30, what='tasks run before the failover')
    old = topology.current_master()
    started, wall_started = time.monotonic(), time.time()
    if how == 'kill-master':
        old.kill()
    else:
        topology.failover()
    new = topology.wait_master_changed(old, timeout=30)
    promoted = time.monotonic()
    if how == 'sentinel-failover':
        topology.wait_demoted(old, new, timeout=30)
    completed = time.monotonic()
    time.sleep(2.0)   # kept: publishes go on after the failover (those must all run)
    publisher.stop()
    after = publisher.returned_after(completed)
    window = publisher.returned_between(started, completed)
    all_ran = rig.wait_ran(after, timeout=30)
    time.sleep(3 * 3)   # kept: 3 visibility timeouts: whatever is reclaimed would run twice by now
    ran = rig.ran()
    lost_after = [t for t in after if not ran[t]]
    lost_in_window = [t for t in window if not ran[t]]
    # Clients ask the Sentinels every second: past that, every publish reaches the new master,
    # even while the old one still takes writes (about 10 s after SENTINEL FAILOVER).
    followed = publisher.returned_after(promoted + FOLLOW_WITHIN)
    lost_once_followed = [t for t in followed if not ran[t]]
    duplicated = sorted(t for t, n in ran.items() if n > 1)
    runs = [t for t, _ in rig.run_times()]
    wall_completed = wall_started + (completed - started)
    report(how=how, promoted_after=promoted - started, completed_after=completed - started,
           worker_ran_nothing_for=longest_gap(runs, wall_started, wall_completed + 2.0),
           publish_longest=publisher.longest(), publish_failed=len(publisher.failed),
           published=len(publisher.returned), returned_after_failover=len(after),
           lost_after_failover=len(lost_after), returned_in_window=len(window),
           lost_in_window=len(lost_in_window), lost_once_followed=len(lost_once_followed),
           ran_twice=len(duplicated),
           worker_lost_connection=worker.count('Connection to broker lost'))
    assert after and all_ran and not lost_after, (lost_after, worker.text()[-3000:])
    assert not lost_once_followed, (lost_once_followed, worker.text()[-3000:])
    assert worker.alive()


# -- publish confirmation by replicas (WAIT) -------------------------------------------

def wait_calls(server):
    """How many WAIT commands ``server`` ran."""
    with server.client() as client:
        return client.info('commandstats').get('cmdstat_wait', {}).get('calls', 0)


def test_publish_wait_replicas_confirms_every_publish_or_raises(topology, unique_name):
    """Each publish path sends one WAIT behind its write, and returns once the replica has it;
    with the replica stopped, the publish raises NotReplicated (the master keeps the entry)."""
    master, replica = topology.servers
    keys = Keys(unique_name + ':')
    options = {'global_keyprefix': unique_name + ':', 'master_name': MASTER,
               'publish_wait_replicas': 1, 'publish_wait_timeout': 0.5}
    with Connection(topology.urls(), transport_options=options) as conn:
        channel = conn.default_channel
        direct = Exchange('cs-direct', 'direct')
        fanout = Exchange('cs-fanout', 'fanout')
        for queue in (Queue('plain'), Queue('routed', direct, 'rk'), Queue('broadcast', fanout)):
            queue(channel).declare()
        producer = Producer(channel)

        def publish_every_way():
            producer.publish({'n': 1}, routing_key='plain')                    # XADD
            producer.publish({'n': 2}, exchange=direct, routing_key='rk')      # route script
            producer.publish({'n': 3}, exchange=fanout)                        # append script
            with producer.batch(max_size=10):                                  # one pipeline
                for n in range(5):
                    producer.publish({'n': n}, routing_key='plain')

        publish_every_way()   # the first call of a script may meet NOSCRIPT: sent again, WAIT too
        before = wait_calls(master)
        publish_every_way()
        assert wait_calls(master) - before == 4
        with replica.client() as r:   # the replica has them as the publishes returned
            assert r.xlen(keys.stream('plain')) == 12
            assert r.xlen(keys.stream('routed')) == r.xlen(keys.stream('broadcast')) == 2

        os.kill(replica.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(errors.NotReplicated, match=r'0 of 1 replica\(s\)'):
                producer.publish({'n': 'unconfirmed'}, routing_key='plain')
            took = time.monotonic() - started
        finally:
            os.kill(replica.proc.pid, signal.SIGCONT)
        assert 0.5 <= took < 2.0, took
        with master.client() as r:   # not withdrawn: the master has it, and may deliver it
            assert r.xlen(keys.stream('plain')) == 13
        wait_until(lambda: topology.healthy(), timeout=10)
        producer.publish({'n': 'again'}, routing_key='plain')   # the replica is back: confirmed


# -- celery streams status / drain / nuke -----------------------------------------------

def run_cli(app_path, *args):
    env = dict(clean_env(), PYTHONPATH=str(app_path) + os.pathsep + str(ROOT))
    done = subprocess.run([sys.executable, '-m', 'celery', '-A', 'sentinelcli', 'streams', *args],
                          cwd=app_path, env=env, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout + done.stderr


def test_streams_commands_take_sentinel_urls(topology, tmp_path, unique_name):
    """status, drain and nuke find the master through the Sentinels, as a worker does,
    and follow it after a failover."""
    prefix = unique_name + ':'
    (tmp_path / 'sentinelcli.py').write_text(
        'import celery_streams\nfrom celery import Celery\n'
        'app = Celery("cli", broker=%r)\n'
        'app.conf.broker_transport_options = {"master_name": %r, "global_keyprefix": %r}\n'
        % (topology.urls(), MASTER, prefix))
    keys = Keys(prefix)
    with Connection(topology.urls(), transport_options={'global_keyprefix': prefix,
                                                       'master_name': MASTER}) as conn:
        Producer(conn.default_channel).publish({'n': 1}, routing_key='jobs', declare=[Queue('jobs')])

    code, output = run_cli(tmp_path, 'status')
    assert code == 0, output
    assert 'jobs' in output and 'sentinel-streams://' in output, output

    old = topology.current_master()
    topology.failover()
    new = topology.wait_master_changed(old)
    code, output = run_cli(tmp_path, 'drain', '-f')
    assert code == 0, output
    assert "Drained queue 'jobs'" in output and '1 message' in output, output
    with new.client() as r:
        assert r.xlen(keys.stream('jobs')) == 0
        code, output = run_cli(tmp_path, 'nuke', '-f')
        assert code == 0, output
        assert not list(r.scan_iter(match=keys.match_all)), output


def test_a_command_says_in_one_line_when_no_sentinel_answers(tmp_path):
    port = servers.free_port()
    (tmp_path / 'sentinelcli.py').write_text(
        'import celery_streams\nfrom celery import Celery\n'
        'app = Celery("cli", broker="sentinel-streams://127.0.0.1:%d")\n'
        'app.conf.broker_transport_options = {"master_name": "nobody"}\n' % port)
    code, output = run_cli(tmp_path, 'status')
    assert code != 0 and 'Traceback' not in output, output
    assert "no master 'nobody' from the Sentinels at 127.0.0.1:%d" % port in output, output


def test_flower_shows_queue_lengths_through_the_sentinels(topology, unique_name):
    """Flower given the Sentinels' URLs and ``master_name``: the default queue's length over every
    priority bucket, from the master the Sentinels name."""
    pytest.importorskip('flower')
    prefix = unique_name + ':'
    send_adds(topology.urls(), {'global_keyprefix': prefix, 'master_name': MASTER}, (0, 5, 9))
    env = dict(clean_env(), E2E_BROKER=topology.urls(), E2E_BACKEND='cache+memory://',
               E2E_PREFIX=prefix, E2E_MASTER_NAME=MASTER, PYTHONPATH=str(ROOT))
    with flower(env) as base:
        status, body = flower_get(base, '/api/queues/length')
    assert (status, json.loads(body)) == (200, {'active_queues': [{'name': 'celery', 'messages': 3}]})
