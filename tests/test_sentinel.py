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
from celery_streams import errors, ledger
from celery_streams.connection import TRANSPORT_PATH
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

#: ``publish_wait_replicas`` of the failover test's worker and publisher: not set (the
#: default: 1 with Sentinel) unless ``CS_TEST_WAIT_REPLICAS`` says (``0``: opted out, the
#: behaviour before issue #22, to measure side by side).
OPTED = os.environ.get('CS_TEST_WAIT_REPLICAS')
WAIT_OPTIONS = {} if OPTED is None else {'publish_wait_replicas': int(OPTED)}
#: The failover test's publisher: a task every 20 ms (with the publish itself, ~40/s), each running 20 ms.
PUBLISH_EVERY, TASK_SECONDS = 0.02, 0.02


@pytest.mark.parametrize('how', ['sentinel-failover', 'kill-master'])
def test_no_returned_publish_is_lost_in_a_failover(rig, report, how):
    """Every task whose publish returned runs, whenever it returned: before, during and
    after the failover (issue #22: with the default options, publishes in the second before
    the clients noticed a ``SENTINEL FAILOVER`` went to the old master, whose demotion threw
    them away). The figures (publishes that returned, lost, raised, ran twice, how long the
    worker ran nothing, the longest publish, the ledger's balance) are printed."""
    topology = rig.topology
    worker = rig.worker('-c', '2', vt=3, **({} if OPTED is None else {'wait_replicas': OPTED}))
    app = rig.client_app(**WAIT_OPTIONS)
    publisher = Publisher(app, interval=PUBLISH_EVERY, seconds=TASK_SECONDS)
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
    time.sleep(2.0)   # kept: publishes go on after the failover
    publisher.stop()
    returned = publisher.tokens()
    rig.wait_ran(returned, timeout=30)
    time.sleep(3 * 3)   # kept: 3 visibility timeouts: whatever is reclaimed would run twice by now
    ran = rig.ran()
    lost = [t for t in returned if not ran[t]]
    window = publisher.returned_between(started, completed)
    wall_completed = wall_started + (completed - started)
    [audit] = ledger.audit(rig.redis(), global_keyprefix=rig.prefix, queues=['celery'])
    report(how=how, ledger_published=audit.count('published'), ledger_acked=audit.count('acked'),
           ledger_unaccounted=audit.unaccounted, publish_wait_replicas='default' if OPTED is None else OPTED,
           publish_rate='%.1f/s' % (len(publisher.published) / (publisher.published[-1][2]
                                                                  - publisher.published[0][1])),
           promoted_after=promoted - started, completed_after=completed - started,
           worker_ran_nothing_for=rig.longest_pause(wall_started, wall_completed + 2.0),
           publish_longest=publisher.longest(), publish_failed=len(publisher.failed),
           published=len(returned), lost=len(lost), returned_in_window=len(window),
           lost_in_window=len([t for t in window if not ran[t]]),
           ran_twice=len([t for t, n in ran.items() if n > 1]),
           worker_lost_connection=worker.count('Connection to broker lost'))
    assert returned and not lost, (lost, publisher.failed, worker.text()[-3000:])
    assert not publisher.failed, publisher.failed   # the retry policy rode the failover out
    assert worker.alive()
    # the ledger, on the new master, balances: counters replicate with what they count
    assert audit.unaccounted == 0, audit.as_dict()


@pytest.fixture
def slow_topology(preferred_server_binary):
    """Sentinels that call a master down after 2 s (``down-after-milliseconds 2000``)."""
    with SentinelTopology(preferred_server_binary.path, master_name=MASTER,
                          down_after_ms=2000, failover_timeout_ms=6000) as topology:
        yield topology


def test_the_documented_retry_policy_rides_out_a_promotion(slow_topology, journal_server,
                                                           unique_name, report):
    """docs/sentinel.md's ``task_publish_retry_policy`` (40 retries, 0.25 s at most between
    them: ~10 s) with three ``;``-separated Sentinel URLs outlasts the promotion after a
    ``kill -9`` of the master with ``down-after-milliseconds 2000`` (issue #22: kombu cycled
    through the URLs and slept once per cycle, so it gave up after ~2.4 s)."""
    with SentinelRig(slow_topology, journal_server, unique_name + ':', MASTER) as rig:
        assert rig.publish_retry == rigs.PUBLISH_RETRY and len(slow_topology.sentinel_servers) == 3
        publisher = Publisher(rig.client_app(), interval=0.05)
        publisher.start()
        wait_until(lambda: len(publisher.tokens()) >= 10, timeout=30, what='publishes')
        old = slow_topology.current_master()
        started = time.monotonic()
        old.kill()
        slow_topology.wait_master_changed(old, timeout=30)
        promoted = time.monotonic() - started
        wait_until(lambda: publisher.returned_after(started + promoted), timeout=30,
                   what='a publish to the new master')
        publisher.stop()
        report(promoted_after=promoted, publish_longest=publisher.longest(),
               publish_failed=len(publisher.failed), published=len(publisher.tokens()))
        assert promoted > 2.0
        assert not publisher.failed, publisher.failed
        assert publisher.longest() >= promoted - 0.5


def test_broker_transport_setting_takes_sentinel_urls(rig):
    """``broker_transport='celery_streams.transport:Transport'`` (the README's first way) with
    the ``;``-separated ``sentinel-streams://`` URLs and ``master_name``: a worker starts and
    runs what a client app publishes (issue #22: refused, with a message telling to write the
    URL as sentinel-streams://, which it was)."""
    worker = rig.worker(transport=TRANSPORT_PATH)
    app = rig.client_app()
    app.conf.broker_transport = TRANSPORT_PATH
    app.send_task(rigs.RECORD, args=('via-broker-transport',))
    assert rig.wait_ran(['via-broker-transport'], timeout=20) is not None, worker.text()[-2000:]
    with rig.redis() as master:
        assert master.xinfo_groups(rig.keys.stream('celery'))


def test_broker_transport_with_one_sentinel_url_says_what_is_wrong():
    """One ``sentinel-streams://`` URL with ``broker_transport`` set: kombu drops its scheme, so
    it reads as a Redis server; the refusal says so (and how to write it), in one line."""
    from kombu import Connection
    conn = Connection('sentinel-streams://127.0.0.1:26379/0', transport=TRANSPORT_PATH,
                      transport_options={'master_name': MASTER})
    with pytest.raises(errors.ConfigurationError) as caught:
        conn.create_transport()
    text = str(caught.value)
    assert '\n' not in text and 'drop broker_transport' in text and 'list every Sentinel' in text


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


def test_only_a_sentinel_url_waits_for_a_replica_by_default():
    """The default of ``publish_wait_replicas``: 1 with Sentinel and ``publish_confirm='now'``
    (lenient: a master alone takes publishes), 0 (nothing sent, nothing paid) on one server,
    a cluster, or with ``'later'``; a given value as given (strict)."""
    from celery_streams.connection import Address
    from celery_streams.options import Options
    from celery_streams.replication import for_publisher

    class Topology:
        def __init__(self, url, options):
            self.address = Address.from_url(url, options=options)

        master = ('127.0.0.1', 6379)

        def shortfall(self, written_to):
            assert written_to == self.master
            return 'alone'

    sentinel, server = 'sentinel-streams://s1:26379;sentinel-streams://s2:26379', 'redis-streams://h:6379'
    for url, given, replicas, lenient in (
            (sentinel, {}, 1, True), (sentinel, {'publish_wait_replicas': 0}, 0, None),
            (sentinel, {'publish_wait_replicas': 2}, 2, False),
            (sentinel, {'publish_confirm': 'later'}, 0, None),
            (server, {}, 0, None), (server, {'publish_wait_replicas': 1}, 1, False),
            ('redis-streams+cluster://h1:7000,h2:7001', {}, 0, None)):
        if url == sentinel:
            given = dict(given, master_name=MASTER)
        options = Options.from_transport_options(given)
        wait = for_publisher(options, Topology(url, options))
        assert (wait and wait.replicas, wait and wait.lenient) == (replicas or None, lenient), (url, given)
    wait = for_publisher(Options.from_transport_options({'master_name': MASTER}), Topology(sentinel, None))
    assert wait.begin() == ('WAIT', 1, 1000)
    wait.confirm(0)                       # alone: taken, and ROLE is sent instead of WAIT
    assert wait.command == ('ROLE',)
    wait.confirm([b'master', 10, []])
    assert wait.command == ('ROLE',)
    wait.confirm([b'master', 10, [[b'127.0.0.1', b'6380', b'10']]])   # a replica is back
    assert wait.command == ('WAIT', 1, 1000)


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
    assert (status, json.loads(body)) == (200, {'active_queues': [{
        'name': 'celery', 'messages': 3, 'messages_ready': 3, 'messages_unacknowledged': 0,
        'consumers': 0}]})
