"""Redis Sentinel, for real: a master, a replica and three Sentinels on loopback
(``tests/servers.py``, :class:`~tests.servers.SentinelTopology`), real ``celery worker``
processes, real failovers.

The failover tests have a :class:`~tests.rigs.SentinelRig`: workers run
``tests/apps/rig.py``, whose task records every execution into a journal on a
server outside the topology, so a failover never touches the records. The
failover tests print their figures: run with ``-s``. URL and option errors are
in ``tests/test_pure.py``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from kombu import Exchange, Producer, Queue

import celery_streams  # noqa: F401  (registers sentinel-streams://)
from celery_streams import errors
from celery_streams.keys import Keys
from tests import rigs, servers
from tests.helpers import connection, wait_until
from tests.rigs import Publisher, SentinelRig
from tests.servers import SentinelTopology
from tests.workers import ROOT, app_env, clean_env, flower, flower_get, send_adds

pytestmark = pytest.mark.slow

MASTER = 'cs-master'

journal_server = rigs.journal_server   # the fixture


@pytest.fixture
def topology(preferred_server_binary):
    with SentinelTopology(preferred_server_binary.path, master_name=MASTER) as topology:
        yield topology


@pytest.fixture
def rig(topology, journal_server, unique_name):
    with SentinelRig(topology, journal_server, unique_name + ':', MASTER) as rig:
        yield rig


# -- failover under a running worker and a steady publisher --------------------------

#: Seconds after a promotion by which every client follows the new master (its renewal
#: thread asks the Sentinels every second).
FOLLOW_WITHIN = 2.0


@pytest.mark.parametrize('how', ['sentinel-failover', 'kill-master'])
def test_worker_and_publisher_follow_a_failover(rig, report, how):
    """Every task whose publish returned after the failover completed runs; the figures
    (how long the worker ran nothing, duplicates, losses in the failover window) are printed."""
    topology = rig.topology
    worker = rig.worker('-c', '2', vt=3)
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
    all_ran = rig.wait_ran(after, timeout=30) is not None
    time.sleep(3 * 3)   # kept: 3 visibility timeouts: whatever is reclaimed would run twice by now
    ran = rig.ran()
    lost_after = [t for t in after if not ran[t]]
    lost_in_window = [t for t in window if not ran[t]]
    # Clients ask the Sentinels every second: past that, every publish reaches the new master,
    # even while the old one still takes writes (about 10 s after SENTINEL FAILOVER).
    followed = publisher.returned_after(promoted + FOLLOW_WITHIN)
    lost_once_followed = [t for t in followed if not ran[t]]
    duplicated = sorted(t for t, n in ran.items() if n > 1)
    wall_completed = wall_started + (completed - started)
    report(how=how, promoted_after=promoted - started, completed_after=completed - started,
           worker_ran_nothing_for=rig.longest_pause(wall_started, wall_completed + 2.0),
           publish_longest=publisher.longest(), publish_failed=len(publisher.failed),
           published=len(publisher.tokens()), returned_after_failover=len(after),
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
    with connection(topology.urls(), unique_name + ':', master_name=MASTER,
                    publish_wait_replicas=1, publish_wait_timeout=0.5) as conn:
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
    with connection(topology.urls(), prefix, master_name=MASTER) as conn:
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
    env = app_env(None, prefix, broker=topology.urls(), backend='cache+memory://',
                  E2E_MASTER_NAME=MASTER)
    with flower(env) as base:
        status, body = flower_get(base, '/api/queues/length')
    assert (status, json.loads(body)) == (200, {'active_queues': [{'name': 'celery', 'messages': 3}]})
