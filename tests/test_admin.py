"""celery_streams.admin against real servers: drain, nuke, status, client_from_url."""
from __future__ import annotations

import pytest
from kombu import Exchange, Queue
import redis

from celery_streams import admin
from tests.helpers import snapshot


def groups_without_pending(client, stream):
    """XINFO GROUPS minus the counts a drain changes by design (PEL size; lag, derived from the length)."""
    return [{k: v for k, v in g.items() if k not in ('pending', 'lag')}
            for g in client.xinfo_groups(stream)]


def test_drain_keeps_groups_and_removes_entries_and_pending(state):
    r, keys = state.redis, state.keys
    before = {q: groups_without_pending(r, keys.stream(q)) for q in ('a', 'b')}
    consumers = [c['name'] for c in r.xinfo_consumers(keys.stream('a'), 'celery')]

    drained = admin.drain(r, global_keyprefix=state.prefix)

    assert [(d.queue, d.kind, d.removed, d.pending_cleared, d.groups_kept) for d in drained] == [
        ('a', 'task', 5, 2, ['celery']), ('b', 'task', 3, 0, ['celery'])]
    for q in ('a', 'b'):
        assert r.exists(keys.stream(q))
        assert r.xlen(keys.stream(q)) == 0
        assert r.xpending(keys.stream(q), 'celery')['pending'] == 0
        assert groups_without_pending(r, keys.stream(q)) == before[q]
    assert [c['name'] for c in r.xinfo_consumers(keys.stream('a'), 'celery')] == consumers
    # broadcast queue and dead letters were left alone
    assert r.xlen(keys.stream('bq')) == 2
    assert r.xlen(keys.dead_letters('a')) == 1


def test_drained_messages_held_by_a_worker_never_come_back(state):
    admin.drain(state.redis, global_keyprefix=state.prefix, queues=['a'])
    state.close(restore=True)   # the worker shuts down and puts back what it held
    assert state.redis.xlen(state.keys.stream('a')) == 0


def test_drain_still_reads_after_drain(state):
    admin.drain(state.redis, global_keyprefix=state.prefix, queues=['b'])
    state.producer.publish({'after': 1}, exchange='b', routing_key='b')
    queue = state.channel.connection.client.SimpleQueue('b')
    try:
        assert queue.get(timeout=5).payload == {'after': 1}
    finally:
        queue.close()


def test_drain_with_dead_letters_and_broadcast(state):
    drained = admin.drain(state.redis, global_keyprefix=state.prefix, queues=['a', 'bq'],
                          include_broadcast=True, dead_letters=True)
    assert [(d.queue, d.kind, d.removed, d.dead_letters_removed) for d in drained] == [
        ('a', 'task', 5, 1), ('bq', 'fanout', 2, 0)]
    assert state.redis.xlen(state.keys.dead_letters('a')) == 0
    assert state.redis.xinfo_groups(state.keys.stream('bq'))


def test_drain_refuses_unknown_and_broadcast_queues_and_changes_nothing(state):
    before = snapshot(state.redis, state.prefix)
    with pytest.raises(admin.UnknownQueue, match="'nope'"):
        admin.drain(state.redis, global_keyprefix=state.prefix, queues=['a', 'nope'])
    with pytest.raises(admin.BroadcastQueue, match="'bq'"):
        admin.drain(state.redis, global_keyprefix=state.prefix, queues=['a', 'bq'])
    assert snapshot(state.redis, state.prefix) == before


def test_drain_dry_run_counts_and_changes_nothing(state):
    before = snapshot(state.redis, state.prefix)
    plan = admin.drain(state.redis, global_keyprefix=state.prefix, dead_letters=True, dry_run=True)
    assert [(d.queue, d.removed, d.pending_cleared, d.dead_letters_removed, d.groups_kept)
            for d in plan] == [('a', 5, 2, 1, ['celery']), ('b', 3, 0, 0, ['celery'])]
    assert snapshot(state.redis, state.prefix) == before


def test_nuke_removes_every_key_under_the_prefix_only(state, redis_server, unique_name,
                                                      streams_state):  # noqa: F811
    other = streams_state(redis_server, unique_name + 'other:')
    other.task_queue('a', published=2, reserved=1)
    outside = unique_name + ':outside'   # shares the prefix text, not the namespace
    state.redis.set(outside, 'x')
    other_before = snapshot(state.redis, other.prefix)

    result = admin.nuke(state.redis, global_keyprefix=state.prefix)

    keys = state.keys
    assert sorted(result.groups) == sorted((keys.stream(q), 'celery') for q in ('a', 'b', 'bq'))
    assert sorted(result.streams) == sorted(
        [keys.stream('a'), keys.stream('b'), keys.stream('bq'), keys.dead_letters('a')])
    assert keys.queues in result.other_keys and keys.schema in result.other_keys
    assert list(state.redis.scan_iter(match=keys.match_all)) == []
    assert snapshot(state.redis, other.prefix) == other_before
    assert state.redis.get(outside) == 'x'


def test_nuke_escapes_glob_characters_in_the_prefix(redis_server, unique_name,
                                                    streams_state):  # noqa: F811
    star = streams_state(redis_server, unique_name + '*[')
    star.task_queue('a', published=1)
    lookalike = streams_state(redis_server, unique_name + 'x[')   # '*' would match 'x'
    lookalike.task_queue('a', published=1)
    before = snapshot(lookalike.redis, lookalike.prefix)

    admin.nuke(star.redis, global_keyprefix=star.prefix)

    assert not star.redis.exists(star.keys.stream('a'))
    assert snapshot(lookalike.redis, lookalike.prefix) == before


def test_nuke_keep_dead_letters_and_dry_run(state):
    before = snapshot(state.redis, state.prefix)
    plan = admin.nuke(state.redis, global_keyprefix=state.prefix, dry_run=True)
    assert len(plan.groups) == 3 and len(plan.streams) == 4
    assert snapshot(state.redis, state.prefix) == before

    result = admin.nuke(state.redis, global_keyprefix=state.prefix, keep_dead_letters=True)
    assert result.kept == [state.keys.dead_letters('a')]
    left = list(state.redis.scan_iter(match=state.keys.match_all))
    assert left == [state.keys.dead_letters('a')]
    assert state.redis.xlen(left[0]) == 1


def test_status_describes_queues_groups_and_consumers(state):
    doc = admin.status(state.redis, global_keyprefix=state.prefix).as_dict()
    assert doc['namespace'] == state.keys.prefix and doc['schema'] == 1
    assert doc['server']['flavor'] in ('redis', 'valkey')
    queues = {q['name']: q for q in doc['queues']}
    assert sorted(queues) == ['a', 'b', 'bq']
    a = queues['a']
    assert (a['kind'], a['exists'], a['length'], a['waiting'], a['pending'], a['dead_letters']) == (
        'task', True, 5, 3, 2, 1)
    assert a['oldest_pending_age'] >= 0
    [group] = a['groups']
    assert group['name'] == 'celery' and group['pending'] == 2
    [consumer] = group['consumers']
    assert consumer['pending'] == 2 and consumer['idle_ms'] >= 0
    assert consumer['alive'] is True   # basic_get marks its consumer alive at once
    state.channel.renew_liveness()      # what the worker's renewal thread does
    doc = admin.status(state.redis, global_keyprefix=state.prefix, queues=['a']).as_dict()
    [group] = doc['queues'][0]['groups']
    assert group['consumers'][0]['alive'] is True
    assert set(group) == {'name', 'stream', 'bucket', 'consumers', 'pending', 'last_delivered_id',
                          'entries_read', 'lag', 'oldest_pending_age'}
    assert (group['stream'], group['bucket']) == (state.keys.stream('a'), 0)
    assert queues['b']['waiting'] == 3 and queues['b']['oldest_pending_age'] is None
    assert queues['bq']['kind'] == 'fanout' and queues['bq']['length'] == 2


def test_status_reports_lag_only_from_redis_7(state, redis_server):
    doc = admin.status(state.redis, global_keyprefix=state.prefix, queues=['a']).as_dict()
    [group] = doc['queues'][0]['groups']
    if redis_server.name == 'redis6.2':
        assert group['lag'] is None and group['entries_read'] is None
    else:
        assert group['lag'] == 3 and group['entries_read'] == 3   # 1 dead letter + 2 reserved


def test_status_lists_unregistered_streams_and_refuses_unknown_queues(state):
    state.redis.xadd(state.keys.stream('stray'), {'payload': '{}'})
    doc = admin.status(state.redis, global_keyprefix=state.prefix).as_dict()
    queues = {q['name']: q for q in doc['queues']}
    assert queues['stray']['kind'] is None and queues['stray']['waiting'] == 1
    with pytest.raises(admin.UnknownQueue):
        admin.status(state.redis, global_keyprefix=state.prefix, queues=['nope'])


def test_client_accepts_the_redis_schemes(redis_server):
    for scheme in ('redis', 'redis-streams'):
        client = admin.client_from_url('%s://127.0.0.1:%d/3' % (scheme, redis_server.port))
        assert client.ping()
        assert client.connection_pool.connection_kwargs['db'] == 3
    tls = admin.client_from_url('rediss-streams://u:pw@127.0.0.1:%d/0' % redis_server.port)
    assert tls.connection_pool.connection_kwargs['username'] == 'u'
    assert tls.connection_pool.connection_class is redis.SSLConnection


def test_priority_buckets_are_counted_drained_and_nuked(redis_server, unique_name,
                                                        streams_state):  # noqa: F811
    st = streams_state(redis_server, unique_name + ':')
    st.task_queue('pq')
    for priority in (0, 5, 5, 9):
        st.producer.publish({'p': priority}, exchange='pq', routing_key='pq', priority=priority)
    held = Queue('pq', Exchange('pq'), 'pq')(st.channel).get()
    assert held.payload == {'p': 0}   # kombu semantics: the lowest number first
    buckets = [st.keys.stream('pq'), st.keys.stream('pq', 3), st.keys.stream('pq', 9)]

    [queue] = admin.status(st.redis, global_keyprefix=st.prefix).as_dict()['queues']
    assert queue['streams'] == buckets
    assert (queue['length'], queue['waiting'], queue['pending']) == (4, 3, 1)
    assert (queue['groups'][0]['bucket'], queue['groups'][0]['pending']) == (0, 1)
    groups = {stream: groups_without_pending(st.redis, stream) for stream in buckets}

    [drained] = admin.drain(st.redis, global_keyprefix=st.prefix)
    assert (drained.removed, drained.pending_cleared, drained.streams) == (4, 1, buckets)
    for stream in buckets:
        assert st.redis.xlen(stream) == 0
        assert groups_without_pending(st.redis, stream) == groups[stream]

    result = admin.nuke(st.redis, global_keyprefix=st.prefix)
    assert set(buckets) <= set(result.streams)
    assert not st.redis.exists(*buckets)
