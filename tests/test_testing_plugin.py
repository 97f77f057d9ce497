"""The user-facing pytest plugin, used the way its docstring says, with Celery's own fixtures."""
import pytest

pytest_plugins = ['celery_streams.testing']


@pytest.fixture(scope='session')
def celery_config(streams_celery_config):
    return streams_celery_config


@pytest.fixture(scope='session')
def celery_worker_pool():
    return 'solo'


def test_celery_fixtures_run_tasks_on_the_streams_transport(celery_session_app, celery_session_worker):
    @celery_session_app.task
    def multiply(x, y):
        return x * y

    celery_session_worker.reload()
    assert type(celery_session_app.connection().transport).__module__ == 'celery_streams.transport'
    assert multiply.delay(6, 7).get(timeout=10) == 42


INNER = '''
import pytest

pytest_plugins = ['celery_streams.testing']


@pytest.fixture(scope='session')
def celery_config(streams_celery_config):
    return streams_celery_config


@pytest.fixture(scope='session')
def celery_worker_pool():
    return 'solo'


def test_inner(celery_session_app, celery_session_worker, streams_key_prefix):
    @celery_session_app.task
    def multiply(x, y):
        return x * y

    celery_session_worker.reload()
    assert type(celery_session_app.connection().transport).__module__ == 'celery_streams.transport'
    assert multiply.delay(6, 7).get(timeout=10) == 42
    open('prefix.txt', 'w').write(streams_key_prefix)
    import os
    import redis
    port = int(os.environ['CELERY_STREAMS_TEST_URL'].rsplit(':', 1)[1].split('/')[0])
    found = {db: len(list(redis.Redis(port=port, db=db).scan_iter(match=streams_key_prefix + '*')))
             for db in (0, 1, 9)}
    assert found[0] == found[1] == 0 and found[9] > 0, found   # broker and results: db 9 only
'''


def test_a_server_of_yours_gets_its_database_and_is_left_clean(redis_server, tmp_path):
    """CELERY_STREAMS_TEST_URL with /9: keys go to db 9 only, and none is left after the session."""
    import os
    import subprocess
    import sys

    import redis
    (tmp_path / 'test_inner.py').write_text(INNER)
    env = {k: v for k, v in os.environ.items() if not k.startswith('CELERY_')}
    env['CELERY_STREAMS_TEST_URL'] = 'redis://127.0.0.1:%d/9' % redis_server.port
    done = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-p',
                           'no:randomly', 'test_inner.py'], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    prefix = (tmp_path / 'prefix.txt').read_text()
    for db in (0, 1, 9):   # the inner test saw its keys in db 9 only; none is left anywhere
        client = redis.Redis(port=redis_server.port, db=db)
        assert list(client.scan_iter(match=prefix + '*')) == [], db


def test_a_url_of_yours_selects_this_transport_with_its_tls_credentials_and_database():
    """CELERY_STREAMS_TEST_URL=rediss://... gives rediss-streams://, never kombu's list transport."""
    from celery_streams.testing import broker_url_for, server_url_for
    server = server_url_for('rediss://:pw@h:6380/3')
    assert (server, broker_url_for(server)) == ('rediss://:pw@h:6380/3', 'rediss-streams://:pw@h:6380/3')
    assert broker_url_for(server_url_for('redis://h')) == 'redis-streams://h:6379/0'
