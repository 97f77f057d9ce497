"""Global rate limits (issue #23): held in Redis, kept where the read happens.

Kombu-level tests on a real server: what a limit lets through and when, what
it holds (in the schedule, not a worker), that other tasks pass it by, that a
change or a clear takes effect live, and the ledger's count. The real-worker
tests (several workers, pools, the global rate) are in test_rate_limits_worker.py.
"""
from __future__ import annotations

import time

import pytest
from kombu import Producer, Queue

from celery_streams import ledger, limits, rates
from celery_streams.errors import ConfigurationError
from celery_streams.options import Options
from celery_streams.keys import Keys
from tests.helpers import connection, consume


def task_message(producer, queue, task, n):
    producer.publish({'n': n}, exchange='', routing_key=queue,
                     headers={'task': task, 'id': '%s-%d' % (task, n)})


def received_at(conn, queue, count, timeout=20):
    """Consume ``count`` messages; ``[(task, n, seconds since the first)]``."""
    got = []
    start = time.monotonic()

    def stamp(messages):
        while len(got) < len(messages):
            m = messages[len(got)]
            got.append((m.headers['task'], m.payload['n'], time.monotonic() - start))
        return len(got) >= count

    consume(conn, Queue(queue), until=stamp, timeout=timeout, must=True)
    return got


def test_a_limit_spaces_starts_and_lets_other_tasks_pass(redis_server, prefix, r):
    """20 limited at 10/s start about 100 ms apart (burst 1); 20 unlimited published behind
    them are all received before the limited ones are half done."""
    with connection(redis_server, prefix, rate_limits={'t.limited': '10/s'}) as conn:
        Queue('work').bind(conn.default_channel).declare()
        producer = Producer(conn.default_channel)
        for n in range(20):
            task_message(producer, 'work', 't.limited', n)
        for n in range(20):
            task_message(producer, 'work', 't.free', n)
        got = received_at(conn, 'work', 40)
    limited = [at for task, _, at in got if task == 't.limited']
    free = [at for task, _, at in got if task == 't.free']
    assert [n for task, n, _ in got if task == 't.limited'] == list(range(20))   # order kept
    assert max(free) < limited[9], (free, limited)
    gaps = [b - a for a, b in zip(limited, limited[1:])]
    assert min(gaps) > 0.05, gaps                          # spaced: never two at once
    assert 1.6 < limited[-1] - limited[0] < 3.0, limited   # 19 intervals of 100 ms
    found = ledger.audit(r, global_keyprefix=prefix, queues=['work'])[0]
    assert found.count('throttled') >= 18   # all but the first (and one admitted per read)
    assert found.unaccounted == 0


def test_held_messages_wait_in_the_schedule_and_a_clear_lets_them_go(redis_server, prefix, r):
    keys = Keys(prefix)
    with connection(redis_server, prefix, rate_limits={'queue:slow': '1/m'}) as conn:
        Queue('slow').bind(conn.default_channel).declare()
        producer = Producer(conn.default_channel)
        for n in range(5):
            task_message(producer, 'slow', 't.any', n)
        first = received_at(conn, 'slow', 1)
        time.sleep(0.3)   # the rest are read and held
        assert r.zcard(keys.scheduled('slow')) == 4
        assert r.xlen(keys.stream('slow')) == 0
        [shown] = limits.state(r, keys, limits.read(r, keys).values(), time.time() * 1000)
        assert (shown['limit'], shown['rate'], shown['held']) == ('queue:slow', '1/m', 4)
        assert limits.clear(r, keys, 'queue:slow') == 4
        rest = received_at(conn, 'slow', 4, timeout=10)
    assert [n for _, n, _ in first + rest] == list(range(5))
    assert max(at for *_, at in rest) < 5   # not a minute apart: the clear let them go


def test_a_changed_rate_holds_at_once(redis_server, prefix, r):
    keys = Keys(prefix)
    with connection(redis_server, prefix, rate_limits={'t.x': '1/m'}) as conn:
        Queue('work').bind(conn.default_channel).declare()
        producer = Producer(conn.default_channel)
        for n in range(6):
            task_message(producer, 'work', 't.x', n)
        received_at(conn, 'work', 1)
        limits.write(r, keys, [rates.limit('t.x', '10/s')])
        rest = received_at(conn, 'work', 5, timeout=10)
    assert max(at for *_, at in rest) < 3


@pytest.mark.parametrize('given, says', [
    ({'t': '5/d'}, "transport option rate_limits: rate '5/d' is not a rate"),
    ({'t': 0}, "rate 0 is not a rate"),
    ({'t': 'fast'}, "rate 'fast' is not a rate"),
    (['t'], 'rate_limits must be a dict'),
    ({'t': {'rate': '1/s', 'burst': 0}}, 'burst of rate limit t must be a whole number'),
    ({'t': {'rate': '1/s', 'bursts': 2}}, "give {'rate': ..., 'burst': ...}"),
    ({'': '1/s'}, 'a rate limit needs a task name or queue:NAME'),
])
def test_a_limit_that_cannot_work_is_refused_in_one_line(given, says):
    with pytest.raises(ConfigurationError) as refused:
        Options.from_transport_options({'rate_limits': given})
    assert says in str(refused.value) and '\n' not in str(refused.value)


def test_rates_in_celerys_notation():
    assert [rates.per_second(r) for r in ('100/s', '10/m', '360/h', 5, 2.5, ' 3 / m ')] == [
        100, 10 / 60, 0.1, 5, 2.5, 0.05]
    assert rates.limit('queue:q', '1/s').name == 'queue:q'
    assert rates.limit('proj.t', '1/s').field == 'task:proj.t'
