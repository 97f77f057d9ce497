"""Redis Cluster, for real: the ``celery streams`` commands on 3 masters and 3 replicas.

One cluster (:class:`~tests.servers.ClusterTopology`) per server kind that runs one
(Redis 7, Valkey 8), started once for the module. Each test makes its queues under
a prefix of its own, by writing the transport's own keys (the ``keys`` fixture, its scripts),
with names whose slots land on every master; then runs the commands in-process through
``celery`` with a ``redis-streams+cluster://`` URL. The slot migration and failover
tests come last: they move slots, and every test finds where its queues live anew.
"""
from __future__ import annotations

import json
import socket
import time

import pytest
from kombu import Connection, Producer, Queue
from redis.cluster import RedisCluster
from redis.crc import key_slot

import celery_streams  # noqa: F401  (registers the schemes)
from celery_streams.connection import client_from_url
from celery_streams.deadletters import record
from celery_streams.errors import ConfigurationError
from celery_streams.depth import queue_depths
from celery_streams.scripts import Scripts
from tests import servers
from tests.helpers import one_line
from tests.servers import ClusterTopology, ClusterUnsupported
from tests.workers import ROOT, clean_env, flower, flower_get, send_adds

pytestmark = pytest.mark.needs_server

FAR_FUTURE_MS = 4102444800000   # 2100-01-01: scheduled messages that never come due here


@pytest.fixture
def rc(cluster):
    """A plain redis-py cluster client, to write and look at the transport's keys."""
    client = cluster.client()
    yield client
    client.close()


def spread_names(cluster, per_master=2, stem='q'):
    """Queue names, ``per_master`` on each master (their hash tags decide their slots)."""
    wanted = {s.port: per_master for s in cluster.primaries()}
    names, i = [], 0
    while any(wanted.values()):
        name = '%s%d' % (stem, i)
        owner = cluster.master_for('{%s}' % name).port
        if wanted.get(owner):
            wanted[owner] -= 1
            names.append(name)
        i += 1
    return names


def make_queue(rc, keys, name, *, messages, read=1, dead=1, scheduled=1):
    """A task queue as a worker leaves it: in the registry, ``messages`` in its stream,
    ``read`` of them delivered (pending), ``dead`` dead letters, ``scheduled`` waiting."""
    scripts, stream = Scripts(rc), keys.stream(name)
    rc.hset(keys.queues, name, 'task')
    rc.xgroup_create(stream, 'celery', '0', mkstream=True)
    for n in range(messages):
        rc.xadd(stream, {'payload': '{"n": %d}' % n})
    if read:
        rc.xreadgroup('celery', 'w1', {stream: '>'}, count=read)
    for n in range(dead):
        rc.xadd(keys.dead_letters(name),
                record(name, stream, '1-%d' % n, {'payload': '{"dead": %d}' % n}, 'test'))
    for n in range(scheduled):
        scripts.schedule(keys=[keys.scheduled(name), stream],
                         args=[FAR_FUTURE_MS, 0, 'token%d' % n, '{"later": %d}' % n, '0'])


def transport_keys(cluster, keys):
    """Every key under the prefix on every master, by a SCAN of each master itself."""
    found = set()
    for server in cluster.primaries():
        with server.client(decode_responses=True) as client:
            found |= set(client.scan_iter(match=keys.match_all, count=1000))
    return found


@pytest.fixture
def queues(cluster, rc, keys):
    """Two queues on each master: ``name -> messages`` (the n-th has n + 2)."""
    names = spread_names(cluster)
    assert len({cluster.master_for(keys.stream(q)).port for q in names}) == 3
    made = {}
    for n, name in enumerate(names):
        make_queue(rc, keys, name, messages=n + 2)
        made[name] = n + 2
    return made


def status_of(run, cluster, prefix, url=None):
    result = run('--broker', url or cluster.urls(), 'streams', 'status', '--prefix', prefix, '--json')
    assert result.exit_code == 0, result.output
    return {q['name']: q for q in json.loads(result.output)['queues']}


# -- URLs -------------------------------------------------------------------------

def test_client_from_url_gives_a_cluster_client_that_knows_every_master(cluster):
    client = client_from_url(cluster.urls().split(',')[0])   # one seed is enough
    try:
        assert isinstance(client, RedisCluster)
        assert {n.port for n in client.get_primaries()} == {s.port for s in cluster.primaries()}
    finally:
        client.close()


@pytest.mark.parametrize('url, words', [
    ('redis-streams+cluster://127.0.0.1:{port}/1', 'database 0 only'),
    ('redis-streams+cluster://127.0.0.1:{port},127.0.0.1:port', "seed node '127.0.0.1:port'"),
    ('redis-streams+cluster://127.0.0.1:{port};redis-streams://127.0.0.1:{port}', 'mix'),
])
def test_url_errors_are_one_line(run, cluster, url, words):
    result = run('--broker', url.format(port=cluster.servers[0].port), 'streams', 'status')
    assert result.exit_code != 0
    line = one_line(result)
    assert words in line and 'Traceback' not in result.output, line


def test_an_unreachable_seed_is_one_line(run):
    result = run('--broker', 'redis-streams+cluster://127.0.0.1:%d' % servers.free_port(),
                 'streams', 'status')
    assert result.exit_code == 69
    assert one_line(result).startswith('Error: cannot reach Redis at redis-streams+cluster://'), result.output


def test_a_seed_that_is_no_cluster_node_is_one_line(run, fresh_redis_server):
    server = fresh_redis_server()
    result = run('--broker', 'redis-streams+cluster://127.0.0.1:%d' % server.port, 'streams', 'status')
    assert result.exit_code == 1
    line = one_line(result)
    assert 'the seed nodes 127.0.0.1:%d are not a usable Redis Cluster' % server.port in line, line


def test_a_publish_goes_to_the_master_of_its_queue_given_either_form_of_url(cluster, rc, keys, prefix):
    names = spread_names(cluster, per_master=1, stem=prefix.rstrip(':') + 'p')
    for url in (cluster.urls(), cluster.urls().replace(',', ';redis-streams+cluster://')):
        with Connection(url, transport_options={'global_keyprefix': prefix}) as connection:
            producer = Producer(connection)
            for name in names:
                producer.publish({'to': name}, routing_key=name, declare=[Queue(name)])
    for name in names:
        owner = cluster.master_for(keys.stream(name)).client()
        entries = owner.xrange(keys.stream(name))
        assert [json.loads(json.loads(f[b'payload'])['body']) for _, f in entries] == [{'to': name}] * 2
        owner.close()


def test_a_consumer_of_queues_on_every_master_shares_one_prefetch_window(cluster, rc, keys, prefix):
    """Reads go out on every master at once; together they never take more than the window."""
    names = spread_names(cluster, per_master=2, stem=prefix.rstrip(':') + 'w')
    with Connection(cluster.urls(), transport_options={'global_keyprefix': prefix}) as connection:
        producer = Producer(connection)
        for name in names:
            for n in range(30):
                producer.publish({'n': n}, routing_key=name, declare=[Queue(name)])
        got = []
        channel = connection.channel()
        channel.basic_qos(0, 10, False)
        consumer = connection.Consumer([Queue(name) for name in names], channel=channel,
                                       callbacks=[lambda body, message: got.append(message)])
        consumer.consume()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                connection.drain_events(timeout=0.2)
            except socket.timeout:
                pass
        held = sum(rc.xpending(keys.stream(name), 'celery')['pending'] for name in names)
        assert (len(got), held) == (10, 10)   # nothing read beyond the window, on any master
        for message in got:
            message.ack()
        got.clear()
        while len(got) < 170 and time.monotonic() < deadline + 20:   # the rest, acking as they come
            try:
                connection.drain_events(timeout=0.2)
            except socket.timeout:
                pass
            for message in got[-10:]:
                if not message.acknowledged:
                    message.ack()
        assert len(got) == 170
        assert sum(rc.xpending(keys.stream(name), 'celery')['pending'] for name in names) <= 10


def test_a_consumer_reads_a_queue_whose_slot_is_halfway_moved(cluster, rc, keys, prefix, caplog):
    """While a slot migrates, its old owner answers ``ASK`` for the keys already moved: the
    consumer reads them from the new owner (after ``ASKING``), publishes and acks follow too."""
    name = spread_names(cluster, per_master=1, stem=prefix.rstrip(':') + 'm')[0]
    stream = keys.stream(name)
    source = cluster.master_for(stream)
    target = next(m for m in cluster.primaries() if m.port != source.port)
    with Connection(cluster.urls(), transport_options={'global_keyprefix': prefix}) as connection:
        producer = Producer(connection)
        producer.publish({'n': 0}, routing_key=name, declare=[Queue(name)])
        got = []
        consumer = connection.Consumer([Queue(name)], callbacks=[
            lambda body, message: (got.append(body['n']), message.ack())])
        consumer.consume()

        def drain(count):
            deadline = time.monotonic() + 10
            while len(got) < count and time.monotonic() < deadline:
                try:
                    connection.drain_events(timeout=0.2)
                except socket.timeout:
                    pass

        drain(1)

        def halfway():
            with target.client() as there:   # the keys moved; the slot is still the source's
                assert there.execute_command('CLUSTER', 'COUNTKEYSINSLOT', key_slot(stream.encode()))
            for n in range(1, 6):   # two reads, each sent to the owner first, then ASKed
                producer.publish({'n': n}, routing_key=name)
                if n in (3, 5):
                    drain(n + 1)

        with caplog.at_level('INFO', logger='celery_streams'):
            cluster.migrate_slot(key_slot(stream.encode()), target, halfway=halfway)
            for n in range(6, 9):
                producer.publish({'n': n}, routing_key=name)
            drain(9)
        # ASK held for one read each: the reader settled on the new owner, without ASKING.
        [lane] = connection.default_channel.reader.lanes.lanes()
        assert not lane.asking
        assert lane.client.connection_pool.connection_kwargs['port'] == target.port
    assert got == list(range(9))
    assert caplog.text.count('is moving to') == 1, caplog.text   # one line per migration
    owner = target.client()
    assert owner.xpending(stream, 'celery')['pending'] == 0   # every ack reached the new owner
    owner.close()


def test_a_queue_is_counted_purged_and_deleted_on_its_master(cluster, rc, keys, prefix):
    """kombu's queue operations on a cluster: each queue's commands (and its purge's
    transaction) run on its own master."""
    names = spread_names(cluster, per_master=1, stem=prefix.rstrip(':') + 'd')
    with Connection(cluster.urls(), transport_options={'global_keyprefix': prefix}) as connection:
        channel = connection.channel()
        producer = Producer(channel)
        for i, name in enumerate(names):
            for n in range(i + 2):
                producer.publish({'n': n}, routing_key=name, declare=[Queue(name)])
            producer.publish({'n': 'later'}, routing_key=name, headers={'eta': '2100-01-01T00:00:00+00:00'})
        assert [channel.queue_declare(name, passive=True).message_count for name in names] == [3, 4, 5]
        assert [channel.queue_purge(name) for name in names] == [3, 4, 5]
        assert [channel.queue_declare(name, passive=True).message_count for name in names] == [0, 0, 0]
        for name in names:
            channel.queue_delete(name)
    assert not [key for key in rc.scan_iter(match=keys.match_queue_keys)]


def test_exchanges_route_to_queues_on_every_master_whoever_bound_them(cluster, rc, keys, prefix):
    """A direct and a topic exchange on a cluster: the bindings live in a slot of their own,
    the queues on every master; queues bound by another process get the message too, and a
    binding whose queue is gone is dropped."""
    from kombu import Exchange
    names = spread_names(cluster, per_master=1, stem=prefix.rstrip(':') + 'x')
    topic = Exchange(prefix + 'topic', 'topic')
    options = {'global_keyprefix': prefix}
    with Connection(cluster.urls(), transport_options=options) as binder:
        channel = binder.channel()
        for name in names:   # bound by this process only
            Queue(name, topic, routing_key='jobs.%s.#' % name)(channel).declare()
        Queue(names[0] + 'gone', topic, routing_key='jobs.#')(channel).declare()
    rc.delete(keys.stream(names[0] + 'gone'))   # it expired (x-expires): its binding is stale
    with Connection(cluster.urls(), transport_options=options) as publisher:
        producer = Producer(publisher)
        topic(publisher.default_channel).declare()   # its type; the bindings are the binder's
        for name in names:
            producer.publish({'to': name}, exchange=topic, routing_key='jobs.%s.run' % name)
        direct = Exchange(prefix + 'direct', 'direct')
        Queue(names[1], direct, routing_key='rk')(publisher.default_channel).declare()
        producer.publish({'to': 'direct'}, exchange=direct, routing_key='rk')
    for name in names:
        bodies = [json.loads(json.loads(f['payload'])['body']) for _, f in rc.xrange(keys.stream(name))]
        assert bodies == [{'to': name}] + ([{'to': 'direct'}] if name == names[1] else [])
    members = rc.smembers(keys.bindings(prefix + 'topic'))
    assert not [m for m in members if m.endswith('gone')], members   # the stale binding went
    assert not rc.exists(keys.stream(names[0] + 'gone'))


# -- the commands on every master ----------------------------------------------------

def test_status_lists_every_queue_of_every_master(run, cluster, queues, prefix):
    found = status_of(run, cluster, prefix)
    assert set(found) == set(queues)
    for name, messages in queues.items():
        q = found[name]
        assert (q['kind'], q['length'], q['pending'], q['waiting'], q['dead_letters'],
                q['scheduled']) == ('task', messages, 1, messages - 1, 1, 1), q
        assert [g['name'] for g in q['groups']] == ['celery']
        assert [c['name'] for c in q['groups'][0]['consumers']] == ['w1']


def test_the_exporter_collects_the_queues_of_every_master(cluster, queues, prefix):
    from celery_streams.exporter import Exporter
    client = client_from_url(cluster.urls())
    try:
        text = Exporter(client, global_keyprefix=prefix).metrics()
    finally:
        client.close()
    assert 'celery_streams_last_scrape_error 0' in text
    for name, messages in queues.items():
        assert 'celery_streams_queue_stream_length{queue_name="%s"} %d' % (name, messages) in text


def test_status_and_scheduled_with_semicolon_separated_seed_urls(run, cluster, queues, prefix):
    url = cluster.urls().replace(',', ';redis-streams+cluster://')
    assert set(status_of(run, cluster, prefix, url)) == set(queues)
    result = run('--broker', url, 'streams', 'scheduled', '--prefix', prefix, '--json')
    assert result.exit_code == 0, result.output
    assert {q['queue']: q['scheduled'] for q in json.loads(result.output)['queues']} == \
        {name: 1 for name in queues}


def test_drain_empties_every_queue_and_keeps_every_group(run, cluster, rc, queues, keys, prefix):
    result = run('--broker', cluster.urls(), 'streams', 'drain', '--prefix', prefix, '-f')
    assert result.exit_code == 0, result.output
    for name, messages in queues.items():
        assert "Drained queue '%s' (task): %d messages, 1 pending entry" % (name, messages) \
            in result.output
        stream = keys.stream(name)
        with cluster.master_for(stream).client(decode_responses=True) as node:   # the owner itself
            assert node.xlen(stream) == 0
            assert [g['name'] for g in node.xinfo_groups(stream)] == ['celery']
            assert node.xpending(stream, 'celery')['pending'] == 0
            assert node.zcard(keys.scheduled(name)) == 0
            assert node.xlen(keys.dead_letters(name)) == 1   # dead letters stay unless asked
    assert all(q['length'] == 0 for q in status_of(run, cluster, prefix).values())


def test_dead_letters_list_and_requeue_on_every_master(run, cluster, rc, queues, keys, prefix):
    result = run('--broker', cluster.urls(), 'streams', 'dead-letters', 'list', '--prefix', prefix,
                 '--json')
    assert result.exit_code == 0, result.output
    assert {q['name']: q['count'] for q in json.loads(result.output)['queues']} == \
        {name: 1 for name in queues}
    result = run('--broker', cluster.urls(), 'streams', 'dead-letters', 'requeue', '--prefix',
                 prefix, '-f')
    assert result.exit_code == 0, result.output
    assert 'Total: %d dead letters requeued' % len(queues) in result.output
    for name, messages in queues.items():
        assert rc.xlen(keys.dead_letters(name)) == 0
        assert rc.xlen(keys.stream(name)) == messages + 1


def test_dead_letters_show_and_purge_on_every_master(run, cluster, rc, queues, keys, prefix):
    last = sorted(queues)[-1]
    [(entry_id, _)] = rc.xrange(keys.dead_letters(last))
    result = run('--broker', cluster.urls(), 'streams', 'dead-letters', 'show', entry_id,
                 '--prefix', prefix, '--json')
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)['dead_letter']['queue'] == last
    result = run('--broker', cluster.urls(), 'streams', 'dead-letters', 'purge', '--prefix', prefix,
                 '-f')
    assert result.exit_code == 0, result.output
    assert 'Total: %d dead letters from %d queues.' % (len(queues), len(queues)) in result.output
    assert not any(rc.exists(keys.dead_letters(name)) for name in queues)


def test_nuke_removes_every_transport_key_on_every_master(run, cluster, rc, queues, keys, prefix):
    rc.sadd(keys.bindings('celery'), 'binding')
    rc.set(keys.schema, 1)
    foreign = [prefix + 'mine', '{%s}other' % prefix, 'celery-streams-%s' % prefix]
    for key in foreign:
        rc.set(key, 'keep')
    before = transport_keys(cluster, keys)
    assert len(before) >= 3 * len(queues) + 3 and rc.exists(keys.queues)
    result = run('--broker', cluster.urls(), 'streams', 'nuke', '--prefix', prefix, '-f')
    assert result.exit_code == 0, result.output
    assert 'Destroyed %d consumer groups' % len(queues) in result.output
    assert transport_keys(cluster, keys) == set()
    assert [rc.get(key) for key in foreign] == ['keep'] * len(foreign)


# -- slots that move, masters that change ------------------------------------------------

def test_status_and_drain_follow_a_queue_whose_slot_moved(run, cluster, rc, keys, prefix):
    [name] = spread_names(cluster, per_master=1, stem='moved')[:1]
    make_queue(rc, keys, name, messages=4)
    source = cluster.master_for(keys.stream(name))
    target = next(s for s in cluster.primaries() if s is not source)
    cluster.migrate_slot(key_slot(keys.stream(name).encode()), target)
    assert cluster.master_for(keys.stream(name)) is target

    q = status_of(run, cluster, prefix)[name]
    assert (q['length'], q['pending'], q['dead_letters'], q['scheduled']) == (4, 1, 1, 1)
    result = run('--broker', cluster.urls(), 'streams', 'drain', '--prefix', prefix, '-f')
    assert result.exit_code == 0, result.output
    with target.client(decode_responses=True) as node:
        assert node.xlen(keys.stream(name)) == 0 and node.zcard(keys.scheduled(name)) == 0
        assert [g['name'] for g in node.xinfo_groups(keys.stream(name))] == ['celery']


def test_status_after_a_failover(run, cluster, rc, queues, keys, prefix):
    name = next(iter(queues))
    old = cluster.master_for(keys.stream(name))
    new = cluster.fail_over(old)
    assert cluster.master_for(keys.stream(name)) is new

    found = status_of(run, cluster, prefix)
    assert {q: found[q]['length'] for q in queues} == queues
    result = run('--broker', cluster.urls(), 'streams', 'drain', '--prefix', prefix, '-f')
    assert result.exit_code == 0, result.output
    assert all(q['length'] == 0 for q in status_of(run, cluster, prefix).values())


def test_status_after_a_master_dies(run, cluster, rc, queues, keys, prefix):
    """The master dies (its replica takes over after the node timeout); it is still listed
    as a seed in the URL: the client asks the next one."""
    name = next(iter(queues))
    dead = cluster.master_for(keys.stream(name))
    new = cluster.kill(dead)
    assert cluster.master_for(keys.stream(name)) is new

    found = status_of(run, cluster, prefix)
    assert {q: (found[q]['length'], found[q]['pending']) for q in queues} == \
        {q: (messages, 1) for q, messages in queues.items()}


@pytest.mark.parametrize('tls', [False, True], ids=['password', 'tls'])
def test_a_cluster_with_a_password_serves_consumers_and_refuses_a_wrong_one_in_one_line(
        preferred_server_binary, run, request, tls):
    """Every connection (the publishes, each read's own to its node, the commands) gets the
    URL's password (and TLS settings, with ``rediss-streams+cluster://``); a wrong or missing
    password is a configuration error, not an endless retry."""
    tls_files, query = None, ''
    if tls:
        tls_files = request.getfixturevalue('tls_files')
        if not servers.supports_tls(preferred_server_binary.path, tls_files):
            pytest.skip('%s has no TLS' % preferred_server_binary.name)
        query = '?ssl_ca_certs=%s&ssl_cert_reqs=required' % tls_files.ca_cert
    try:
        topology = ClusterTopology(preferred_server_binary.path, password='s3cret/pw', tls=tls_files).start()
    except ClusterUnsupported as exc:
        pytest.skip(str(exc).splitlines()[0])
    try:
        url = topology.urls() + query
        assert url.startswith('rediss-streams+cluster://' if tls else 'redis-streams+cluster://')
        names = spread_names(topology, per_master=1, stem='pw')
        with Connection(url) as connection:
            producer = Producer(connection)
            for name in names:
                producer.publish({'to': name}, routing_key=name, declare=[Queue(name)])
            got = []
            connection.Consumer([Queue(name) for name in names], callbacks=[
                lambda body, message: (got.append(body['to']), message.ack())]).consume()
            deadline = time.monotonic() + 10
            while len(got) < len(names) and time.monotonic() < deadline:
                try:
                    connection.drain_events(timeout=0.2)
                except socket.timeout:
                    pass
        assert sorted(got) == sorted(names)
        result = run('--broker', url, 'streams', 'status')
        assert result.exit_code == 0, result.output
        for bad in (url.replace('s3cret%2Fpw', 'wrong'), url.replace(':s3cret%2Fpw@', '')):
            with pytest.raises(ConfigurationError) as refused:
                Connection(bad).connect()
            text = str(refused.value)
            assert text.startswith('Redis refused the credentials for the cluster of 127.0.0.1:')
            assert '\n' not in text and 's3cret' not in text
    finally:
        topology.stop()


def test_queue_depths_on_every_master_count_what_no_consumer_received(cluster, rc, keys, prefix):
    """Flower's queue lengths in one batch: queues on every master, some of their messages
    delivered and not acked, and a queue that does not exist."""
    names = spread_names(cluster, per_master=1, stem=prefix.rstrip(':') + 'f')
    for i, name in enumerate(names):
        make_queue(rc, keys, name, messages=2 + 2 * i, read=i, dead=0, scheduled=0)
    client = client_from_url(cluster.urls())
    try:
        assert queue_depths(client, keys, 'celery', names + [prefix + 'missing']) == [2, 3, 4, 0]
    finally:
        client.close()


@pytest.mark.one_server   # Flower's side does not depend on the server kind
def test_flower_shows_queue_lengths_on_a_cluster(cluster, prefix):
    """Flower given the seed list (several hosts, more than its own URL parsing takes): the
    default queue's length over every priority bucket, from whichever master owns it."""
    pytest.importorskip('flower')
    send_adds(cluster.urls(), {'global_keyprefix': prefix}, (0, 0, 5, 9))
    env = dict(clean_env(), E2E_BROKER=cluster.urls(), E2E_BACKEND='cache+memory://',
               E2E_PREFIX=prefix, PYTHONPATH=str(ROOT))
    with flower(env) as base:
        status, body = flower_get(base, '/api/queues/length')
        page = flower_get(base, '/broker')
    assert (status, json.loads(body)) == (200, {'active_queues': [{
        'name': 'celery', 'messages': 4, 'messages_ready': 4, 'messages_unacknowledged': 0,
        'consumers': 0}]})
    assert page[0] == 200 and 'celery' in page[1]
