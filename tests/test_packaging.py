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


def test_sdist_contains_scripts(dist):
    (sdist,) = dist.glob('*.tar.gz')
    names = tarfile.open(sdist).getnames()
    assert sorted(Path(n).name for n in names if n.endswith('.lua')) == SCRIPTS
    assert any(n.endswith('celery_streams/py.typed') for n in names)


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
