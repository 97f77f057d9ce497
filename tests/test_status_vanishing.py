"""``status`` and the exporter while queues vanish: what is gone is skipped, the rest reported.

Auto-delete queues, ``x-expires``, ``queue_delete`` and ``nuke`` delete
streams (and destroy groups) while an operator or a Prometheus scrape
collects. The deterministic tests delete between two steps of the collection
(a client whose ``XINFO GROUPS`` of one stream is followed at once by the
deletion); the churn tests run a thread that creates and deletes a stream in
a loop and count failed collections (real server, no mocks).
"""
from __future__ import annotations

import threading

import pytest
import redis

from celery_streams import admin
from celery_streams.exporter import Exporter
from celery_streams.keys import Keys

pytestmark = pytest.mark.one_server   # nothing here depends on the server kind

STABLE = 20


class DeletingClient(redis.Redis):
    """A client that runs ``then(victim)`` when it sends command ``when`` on key ``victim``:
    before it (``XINFO STREAM``: the stream vanished between the scan and the collection) or
    after it (``XINFO GROUPS``: between the groups and what the collection reads next)."""

    victim: str = ''
    when: str = ''
    then = None

    def execute_command(self, *args, **options):
        hit = args[:2] == (self.when, self.victim) and self.then is not None
        if hit and self.when == 'XINFO STREAM':
            self.then(self.victim)
        reply = super().execute_command(*args, **options)
        if hit and self.when == 'XINFO GROUPS':
            self.then(self.victim)
        return reply


def make_queue(client, keys: Keys, queue: str, published: int = 3, read: int = 1) -> None:
    """A registered task queue: ``published`` entries, ``read`` of them pending on a consumer."""
    stream = keys.stream(queue)
    client.hset(keys.queues, queue, 'task')
    client.xgroup_create(stream, 'celery', id='0', mkstream=True)
    for i in range(published):
        client.xadd(stream, {'payload': str(i)})
    if read:
        client.xreadgroup('celery', 'w1@host', {stream: '>'}, count=read)


@pytest.fixture
def stable(redis_server, prefix):
    """``STABLE`` queues that stay, and the key schema; the keys are deleted at the end."""
    client = redis_server.client()
    keys = Keys(prefix)
    for n in range(STABLE):
        make_queue(client, keys, 'q%02d' % n)
    yield client, keys
    for key in client.scan_iter(match=keys.match_all):
        client.delete(key)
    client.close()


def deleting_client(redis_server, when, victim, then) -> DeletingClient:
    client = DeletingClient.from_url(redis_server.url, **redis_server.ssl_kwargs)
    client.when, client.victim, client.then = when, victim, then
    return client


def others_complete(found, *also):
    """The stable queues are all there, each with its entries, pending one and consumer."""
    assert [q.name for q in found.queues] == sorted(['q%02d' % n for n in range(STABLE)] + list(also))
    for q in (q for q in found.queues if q.name.startswith('q')):
        assert (q.length, q.pending, q.waiting, len(q.groups), q.exists) == (3, 1, 2, 1, True), q


@pytest.mark.parametrize('registered', [True, False])
def test_a_stream_deleted_after_the_scan_is_skipped(stable, redis_server, registered):
    plain, keys = stable
    make_queue(plain, keys, 'gone')
    if not registered:   # an auto-delete queue removes its registry entry too
        plain.hdel(keys.queues, 'gone')
    client = deleting_client(redis_server, 'XINFO STREAM', keys.stream('gone'), plain.delete)

    found = admin.status(client, global_keyprefix=keys.prefix[:-len('celery-streams:')])

    others_complete(found, *(['gone'] if registered else []))
    if registered:   # the registry still names it: reported, without a stream
        [gone] = [q for q in found.queues if q.name == 'gone']
        assert (gone.exists, gone.streams, gone.length, gone.groups) == (False, [], 0, [])


def test_a_stream_deleted_after_its_groups_were_read_is_skipped(stable, redis_server):
    """The defect: ``XINFO CONSUMERS ... no such key`` failed the whole collection."""
    plain, keys = stable
    make_queue(plain, keys, 'gone')
    client = deleting_client(redis_server, 'XINFO GROUPS', keys.stream('gone'), plain.delete)

    found = admin.status(client, global_keyprefix=keys.prefix[:-len('celery-streams:')])

    others_complete(found, 'gone')
    [gone] = [q for q in found.queues if q.name == 'gone']
    assert gone.groups == []   # its length is what XINFO STREAM saw before the deletion


def test_a_group_destroyed_after_the_groups_were_read_is_skipped(stable, redis_server):
    plain, keys = stable
    make_queue(plain, keys, 'nogroup')
    client = deleting_client(redis_server, 'XINFO GROUPS', keys.stream('nogroup'),
                             lambda stream: plain.xgroup_destroy(stream, 'celery'))

    found = admin.status(client, global_keyprefix=keys.prefix[:-len('celery-streams:')])

    others_complete(found, 'nogroup')
    [queue] = [q for q in found.queues if q.name == 'nogroup']
    assert (queue.exists, queue.length, queue.groups, queue.pending) == (True, 3, [], 0)
    assert queue.waiting == 3   # without the group nothing is pending: every entry waits


@pytest.fixture
def churn(stable):
    """A thread creating and deleting the stream (and group, registry entry) of queue 'churn'
    in a loop until the test ends."""
    plain, keys = stable
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            make_queue(plain, keys, 'churn', published=2, read=1)
            plain.delete(keys.stream('churn'))
            plain.hdel(keys.queues, 'churn')

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield keys.prefix[:-len('celery-streams:')]
    stop.set()
    thread.join(10)


def test_status_never_fails_while_a_queue_comes_and_goes(churn, redis_server, report):
    client = redis_server.client()
    failures, runs = [], 200
    for _ in range(runs):
        try:
            found = admin.status(client, global_keyprefix=churn)
        except redis.ResponseError as exc:
            failures.append(str(exc))
            continue
        assert len([q for q in found.queues if q.name != 'churn']) == STABLE
    report(status_runs=runs, status_failures=len(failures))
    assert failures == []


def test_no_scrape_fails_while_a_queue_comes_and_goes(churn, redis_server, report):
    exporter = Exporter(redis_server.client(), global_keyprefix=churn, interval=0)
    failed, runs = 0, 200
    for _ in range(runs):
        text = exporter.metrics()
        if 'celery_streams_last_scrape_error 1' in text:
            failed += 1
        else:
            assert text.count('celery_streams_queue_info{') >= STABLE
    report(scrapes=runs, scrapes_failed=failed, last_error=exporter.last_error)
    assert failed == 0, exporter.last_error
