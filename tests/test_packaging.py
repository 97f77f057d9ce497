"""The wheel and sdist carry everything the transport needs (Lua scripts, py.typed)."""
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

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
    assert int(done.stdout) == len(SCRIPTS)
