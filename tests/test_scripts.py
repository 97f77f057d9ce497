"""The scripts share one definition of what they do alike, and take their keys from ``keys.py``.

* ``_library.lua`` is put in front of every script: appending a message to a
  queue stream and writing a schedule member happen there only.
* No script knows the key layout: scripts that find queue names in data
  (``route``, ``prune_registry``) put them between affixes given by
  :meth:`Keys.stream_affixes` / :meth:`Keys.scheduled_affixes`.
"""
from __future__ import annotations

import re
from importlib import resources

import pytest
from kombu import Exchange, Producer, Queue

from celery_streams import scripts
from celery_streams.keys import Keys
from celery_streams.scheduler import parse_member
from celery_streams.scripts import LIBRARY, NAMES, Scripts, library_functions, source
from tests.helpers import connection

#: Queue names that break a layout built by hand: braces, the tails of other keys, globs,
#: separators, non-ASCII, whitespace, empty.
ODD_NAMES = ['', 'q', 'a}b', '{x}', '}', 'q}:p3', 'q:scheduled', '*?[', 'a|b', 'ünï cødé', 'tab\there',
             'x\n', '%s%d']
#: Prefixes likewise.
ODD_PREFIXES = ['', 'app:', '{p}', 'a}b:']


def _code(name: str) -> str:
    """The file ``name.lua`` without its comments."""
    text = resources.files(scripts).joinpath(name + '.lua').read_text()
    return '\n'.join(line for line in text.splitlines() if not line.lstrip().startswith('--'))


def _literals(code: str) -> list[str]:
    """The string literals of Lua ``code`` ('...' and "...")."""
    return [a or b for a, b in re.findall(r"'((?:[^'\\\n]|\\.)*)'|\"((?:[^\"\\\n]|\\.)*)\"", code)]


# -- no server ----------------------------------------------------------------

@pytest.mark.parametrize('prefix', ODD_PREFIXES)
def test_affixes_give_exactly_the_keys_of_keys_py(prefix):
    keys = Keys(prefix, priority_steps=range(10))
    for queue in ODD_NAMES:
        for bucket in range(10):
            head, tail = keys.stream_affixes(bucket)
            assert head + queue + tail == keys.stream(queue, bucket)
        head, tail = keys.scheduled_affixes()
        assert head + queue + tail == keys.scheduled(queue)


def test_every_script_that_calls_the_library_is_loaded_behind_it():
    library = resources.files(scripts).joinpath(LIBRARY + '.lua').read_text()
    assert 'KEYS' not in _code(LIBRARY) and 'ARGV' not in _code(LIBRARY)
    assert set(library_functions()) == {'append', 'append_payload', 'schedule_member', 'parse_member',
                                        # uniqueness keys (celery_streams.unique)
                                        'unique_value', 'unique_held', 'unique_field', 'release_unique'}
    behind = set()
    for name in NAMES:
        text = resources.files(scripts).joinpath(name + '.lua').read_text()
        calls = any(function + '(' in _code(name) for function in library_functions())
        assert source(name) == (library + text if calls else text), name
        behind |= {name} if calls else set()
        assert text.startswith('-- ') and 'Returns' in text   # each keeps its own header
    # The ones that append or schedule; the read run on every read is not among them.
    assert behind == {'append', 'promote', 'route', 'restore', 'requeue_dead', 'schedule',
                      'drain_scheduled', 'drain', 'unique', 'unique_hold',
                      'hold', 'unhold'}   # rate limits: into the schedule and out


def test_only_the_library_appends_or_writes_a_schedule_member():
    for name in NAMES:
        literals = _literals(_code(name))
        assert 'XADD' not in literals, name
        assert not [s for s in literals if '|' in s], name   # the member separator


def test_no_script_builds_a_key():
    for name in NAMES:
        literals = _literals(_code(name))
        assert not [s for s in literals if '}' in s or '{' in s or 'celery-streams' in s], name


# -- on a server ----------------------------------------------------------------

def test_route_appends_and_schedules_under_odd_queue_names(redis_server, prefix, r, keys, unique_name):
    """The route script (direct exchange) reaches exactly the keys of keys.py: the stream of
    the message's bucket, or the schedule, of queues declared here and of queues only
    bound (their stream exists)."""
    exchange = Exchange(unique_name, 'direct')
    names = [unique_name + suffix for suffix in (':p3', ':scheduled', 'ü|n', ' *?')]   # no braces
    queues = [Queue(name, exchange, 'rk') for name in names]
    here, elsewhere = queues[:2], queues[2:]   # declared by the publisher / by another process
    eta = '2100-01-01T00:00:00+00:00'
    with connection(redis_server, prefix) as other:
        for queue in elsewhere:
            queue(other.default_channel).declare()
    with connection(redis_server, prefix) as conn:
        producer = Producer(conn.default_channel)
        producer.publish({'n': 1}, exchange=exchange, routing_key='rk', declare=here, priority=4)
        producer.publish({'n': 2}, exchange=exchange, routing_key='rk', priority=0)
        producer.publish({'n': 3}, exchange=exchange, routing_key='rk',
                         headers={'task': 't', 'id': 'i', 'eta': eta}, priority=7)
    for name in names:
        assert r.xlen(keys.stream(name, 3)) == 1 and r.xlen(keys.stream(name)) == 1
        [(member, _)] = r.zrange(keys.scheduled(name), 0, -1, withscores=True)
        parsed = parse_member(member)
        assert parsed.bucket == 6 and len(str(parsed.stamp)) == 16


def test_prune_registry_takes_the_affixes(r, keys):
    live, gone = 'q:p3', 'q:scheduled'
    r.hset(keys.queues, mapping={live: 'task', gone: 'task'})
    r.xadd(keys.stream(live), {'payload': 'x'})
    assert Scripts(r).prune_registry(keys=[keys.queues], args=list(keys.stream_affixes())) == 1
    assert r.hkeys(keys.queues) == [live.encode()]
