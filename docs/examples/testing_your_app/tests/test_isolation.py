"""Each test starts with empty queues: what one test leaves, the next does not see."""
from proj.tasks import add, send_email


def test_one_leaves_messages_behind(streams_app, streams_admin):
    add.delay(1, 1)
    send_email.delay('left@example.com')
    add.apply_async((1, 2), countdown=60)
    assert (streams_admin.waiting('celery'), streams_admin.waiting('emails')) == (1, 1)
    assert streams_admin.scheduled_count('celery') == 1


def test_the_next_starts_clean(streams_app, streams_admin):
    assert (streams_admin.waiting('celery'), streams_admin.waiting('emails')) == (0, 0)
    assert streams_admin.scheduled_count('celery') == 0
