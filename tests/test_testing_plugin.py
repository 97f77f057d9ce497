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
