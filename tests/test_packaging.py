"""The wheel and sdist carry everything the transport needs (Lua scripts, py.typed)."""
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.one_server   # nothing here depends on the server kind

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in (ROOT / 'celery_streams' / 'scripts').glob('*.lua'))


@pytest.fixture(scope='module')
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp('dist')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '-q',
                    '-w', str(out), str(ROOT)], check=True)
    subprocess.run([sys.executable, 'setup.py', '-q', 'sdist', '-d', str(out)], cwd=ROOT, check=True,
                   capture_output=True)
    return out


def test_wheel_contains_scripts_and_py_typed(dist):
    (wheel,) = dist.glob('*.whl')
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(Path(n).name for n in names if n.endswith('.lua')) == SCRIPTS
    assert 'celery_streams/py.typed' in names
    entry_points = next(n for n in names if n.endswith('entry_points.txt'))
    assert 'streams = celery_streams.cli:streams' in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_carries_the_pth_that_registers_the_schemes(dist):
    """``celery_streams.pth`` and its hook module at the root of the wheel (site-packages)."""
    (wheel,) = dist.glob('*.whl')
    archive = zipfile.ZipFile(wheel)
    assert archive.read('celery_streams.pth').decode() == 'import _celery_streams_pth\n'
    assert archive.read('_celery_streams_pth.py') == (ROOT / '_celery_streams_pth.py').read_bytes()


def test_sdist_contains_scripts(dist):
    (sdist,) = dist.glob('*.tar.gz')
    names = tarfile.open(sdist).getnames()
    assert sorted(Path(n).name for n in names if n.endswith('.lua')) == SCRIPTS
    assert any(n.endswith('celery_streams/py.typed') for n in names)
    assert any(n.endswith('/_celery_streams_pth.py') for n in names)


def test_installed_wheel_loads_its_scripts(dist, tmp_path):
    (wheel,) = dist.glob('*.whl')
    target = tmp_path / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(target),
                    str(wheel)], check=True)
    code = ('import celery_streams, celery_streams.scripts as s; '
            'assert celery_streams.__file__.startswith(%r); '
            'print(len([s.source(n) for n in s.NAMES]))' % str(target))
    done = subprocess.run([sys.executable, '-c', code], env={'PYTHONPATH': str(target)},
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == len([name for name in SCRIPTS if name != '_library.lua'])


@pytest.fixture(scope='module')
def clean_venv(dist, tmp_path_factory):
    """A fresh virtualenv with the wheel and its declared dependencies only (no test extra)."""
    import venv
    where = tmp_path_factory.mktemp('clean-venv')
    venv.EnvBuilder(with_pip=True).create(where)
    python = where / 'bin' / 'python'
    (wheel,) = dist.glob('*.whl')
    subprocess.run([str(python), '-m', 'pip', 'install', '-q', '--disable-pip-version-check', str(wheel)],
                   check=True)
    return python


def test_a_plain_install_runs_a_worker_a_publish_and_status(clean_venv, redis_server, tmp_path,
                                                            unique_name):
    """``pip install celery-streams`` alone: a real worker runs a task, ``celery streams status`` answers."""
    app = tmp_path / 'plainapp.py'
    broker = 'redis-streams://127.0.0.1:%d/0' % redis_server.port
    app.write_text(
        'import celery_streams\n'
        'from celery import Celery\n'
        'app = Celery("plain", broker=%r, backend="redis://127.0.0.1:%d/1")\n'
        'app.conf.broker_transport_options = {"global_keyprefix": %r}\n'
        '@app.task\n'
        'def add(x, y):\n'
        '    return x + y\n' % (broker, redis_server.port, unique_name + ':'))
    celery = [str(clean_venv), '-m', 'celery', '-A', 'plainapp']
    env = {'PATH': '/usr/bin:/bin', 'PYTHONPATH': str(tmp_path), 'HOME': str(tmp_path)}
    worker = subprocess.Popen(celery + ['worker', '-P', 'solo', '-l', 'info'], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        code = ('from plainapp import add; print(add.delay(2, 3).get(timeout=60))')
        done = subprocess.run([str(clean_venv), '-c', code], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=90)
        assert done.stdout.strip() == '5', done.stderr
        status = subprocess.run(celery + ['streams', 'status'], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and 'celery' in status.stdout, status.stdout + status.stderr
    finally:
        worker.terminate()
        out, _ = worker.communicate(timeout=30)
    assert 'ready.' in out and 'Traceback' not in out, out[-3000:]


PLAIN_PUBLISHER = """
from kombu import Connection
import kombu.transport.redis   # kombu's own Redis transport imports (its 'packaging' dependency)
with Connection(%r, transport_options={'global_keyprefix': %r}) as conn:
    conn.SimpleQueue('plain').put({'hello': 'world'})
"""


def test_a_plain_install_lets_a_publisher_use_redis_streams_without_importing_it(
        clean_venv, redis_server, tmp_path, unique_name):
    """No `import celery_streams`: the installed celery_streams.pth makes redis-streams:// work."""
    url = 'redis-streams://127.0.0.1:%d/0' % redis_server.port
    done = subprocess.run([str(clean_venv), '-c', PLAIN_PUBLISHER % (url, unique_name + ':')],
                          cwd=tmp_path, env={'PATH': '/usr/bin:/bin', 'HOME': str(tmp_path)},
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    assert redis_server.client().xlen('%s:celery-streams:q:{plain}' % unique_name) == 1


def test_an_editable_install_carries_the_pth_too(tmp_path):
    """`pip install -e .` puts celery_streams.pth beside its own __editable__ .pth."""
    import sysconfig
    import venv
    where = tmp_path / 'editable-venv'
    venv.EnvBuilder(with_pip=False).create(where)
    python = where / 'bin' / 'python'
    subprocess.run([sys.executable, '-m', 'pip', '--python', str(python), 'install', '-q', '--no-deps',
                    '--disable-pip-version-check', '-e', str(ROOT)], check=True, capture_output=True)
    site = subprocess.run([str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert (Path(site) / 'celery_streams.pth').read_text() == 'import _celery_streams_pth\n'
    # kombu from this test's environment, on PYTHONPATH (which runs no .pth), without its own
    # editable finder (a module of the same name): the new install's .pth registers the schemes
    lent = tmp_path / 'lent'
    lent.mkdir()
    for entry in Path(sysconfig.get_paths()['purelib']).iterdir():
        if not entry.name.startswith(('__editable__', 'celery_streams', '_celery_streams')):
            (lent / entry.name).symlink_to(entry)
    code = 'import kombu.transport as t; print(t.TRANSPORT_ALIASES.get("redis-streams"))'
    done = subprocess.run([str(python), '-c', code], cwd=tmp_path, capture_output=True, text=True,
                          env={'PATH': '/usr/bin:/bin', 'PYTHONPATH': str(lent)})
    assert done.stdout.strip() == 'celery_streams.transport:Transport', done.stdout + done.stderr
