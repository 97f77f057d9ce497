"""One interface, two deployments: :mod:`celery_streams.topology` on one server and on a cluster.

Every test here runs the same code against a single server and against a Redis
Cluster of 3 masters (queues whose slots land on every master), so the two
implementations keep one behaviour: the dispatcher, the pipe, the batches a
script may run on, the reader's lanes, the server check and disconnecting.
"""
from __future__ import annotations

import secrets

import pytest
import redis

from celery_streams import errors
from celery_streams.connection import Address
from celery_streams.keys import Keys
from celery_streams.options import Options
from celery_streams.scripts import Scripts
from celery_streams.slots import slot_of
from celery_streams.topology import ClusterTopology, ServerTopology, open_topology
from tests.servers import RedisServer

pytestmark = pytest.mark.needs_server


@pytest.fixture(scope='module')
def single(cluster):
    """One server of the cluster's kind (so both deployments run the same server)."""
    server = RedisServer(binary=cluster.binary, name='single').start()
    yield server
    server.stop()


@pytest.fixture(params=['server', 'cluster'])
def deployment(request, single, cluster):
    """``(topology, keys, queue names spread over every master)`` of one kind, closed after."""
    prefix = 'topo-%s:' % secrets.token_hex(4)
    url = single.url if request.param == 'server' else cluster.urls()
    options = Options.from_transport_options({'global_keyprefix': prefix})
    topology = open_topology(Address.from_url(url), options)
    keys = Keys(prefix)
    queues = ['q%d' % i for i in range(12)]   # 12 hash tags: every master of 3 gets some
    yield topology, keys, queues
    topology.disconnect()


def test_each_kind_opens_its_own_implementation(deployment, request):
    topology, _, _ = deployment
    cluster = 'cluster' in request.node.callspec.id
    assert isinstance(topology, ClusterTopology if cluster else ServerTopology)
    assert topology.scripts_span_keys is not cluster
    assert topology.prints_own_url is cluster


def test_the_dispatcher_answers_commands_of_every_master_in_order(deployment):
    topology, keys, queues = deployment
    commands = [('XADD', keys.stream(q), '*', 'payload', q) for q in queues]
    commands.insert(3, ('INCR', keys.stream(queues[0])))   # WRONGTYPE: an error in its place
    replies = topology.dispatcher.calls(commands)
    assert isinstance(replies[3], redis.ResponseError)
    assert all(isinstance(reply, bytes) for i, reply in enumerate(replies) if i != 3)
    lengths = topology.dispatcher.calls([('XLEN', keys.stream(q)) for q in queues])
    assert lengths == [1] * len(queues)


def test_a_pipe_confirms_every_write_it_was_given(deployment):
    topology, keys, queues = deployment
    pipe = topology.open_pipe()
    got = []
    for queue in queues:
        pipe.write([('XADD', keys.stream(queue), '*', 'payload', 'x')], on_replies=got.append)
    pipe.collect(wait=True)
    assert len(got) == len(queues) and pipe.unconfirmed == 0
    assert all(isinstance(replies[0], bytes) for replies in got)


def test_batches_hold_keys_a_script_may_run_on_together(deployment):
    topology, keys, queues = deployment
    batches = topology.batches(queues, keys.stream)
    assert sorted(q for batch in batches for q in batch) == sorted(queues)
    if topology.scripts_span_keys:
        assert batches == [queues]
    else:
        assert len(batches) == len({slot_of(keys.stream(q)) for q in queues})
        assert all(len({slot_of(keys.stream(q)) for q in batch}) == 1 for batch in batches)
    assert topology.batches([], keys.stream) == []


def test_the_lanes_read_every_queue_once_on_the_node_that_owns_it(deployment):
    topology, keys, queues = deployment
    topology.dispatcher.calls([('XADD', keys.stream(q), '*', 'payload', q) for q in queues])
    lanes = topology.open_lanes(keys.stream)
    try:
        routes = lanes.route(queues)
        assert sorted(q for _, lane_queues in routes for q in lane_queues) == sorted(queues)
        for lane, lane_queues in routes:
            # Each lane's client reads its queues' streams where they live (no MOVED).
            assert lane.client.execute_command('XLEN', keys.stream(lane_queues[0])) == 1
            if not topology.scripts_span_keys:
                assert len({slot_of(keys.stream(q)) for q in lane_queues}) == 1
        assert lanes.client(queues).ping()
        assert lanes.redirected(routes[0][0], None, redis.ResponseError('ERR other')) is False
    finally:
        lanes.close()


def test_the_server_check_writes_the_schema_and_refuses_another(deployment):
    topology, keys, _ = deployment
    scripts = Scripts(topology.client)
    offset_ms = topology.check_server(keys, scripts)
    assert abs(offset_ms) < 5000   # one machine: the clocks agree
    assert int(topology.client.get(keys.schema)) == 1
    topology.client.set(keys.schema, 99)
    with pytest.raises(errors.SchemaMismatch, match='schema 99'):
        topology.check_server(keys, scripts)


def test_following_the_master_is_a_no_op_without_sentinels(deployment):
    topology, _, _ = deployment
    assert topology.follow_master() is False
    assert topology.master is None
