"""The project's tasks through a real worker on the streams transport."""
from celery import chain, chord, group

from proj.tasks import add, flaky, send_email, total


def test_a_routed_task_waits_on_its_own_queue(streams_app, streams_admin):
    send_email.delay('ann@example.com')
    assert streams_admin.waiting('emails') == 1
    assert streams_admin.waiting('celery') == 0


def test_the_worker_consumes_the_routed_queue(streams_worker):
    assert send_email.delay('bob@example.com').get(timeout=10) == 'sent to bob@example.com'


def test_a_countdown_waits_in_the_schedule(streams_worker, streams_admin):
    result = add.apply_async((2, 3), countdown=2)
    assert streams_admin.scheduled_count('celery') == 1
    assert result.get(timeout=15) == 5
    assert streams_admin.scheduled_count('celery') == 0


def test_retries(streams_worker):
    assert flaky.delay(2).get(timeout=10) == 2


def test_a_chain(streams_worker):
    assert chain(add.s(1, 2), add.s(3), add.s(4)).delay().get(timeout=10) == 10


def test_a_group(streams_worker):
    assert group(add.s(i, i) for i in range(5)).delay().get(timeout=10) == [0, 2, 4, 6, 8]


def test_a_chord(streams_worker):
    assert chord(add.s(i, i) for i in range(4))(total.s()).get(timeout=10) == 12
