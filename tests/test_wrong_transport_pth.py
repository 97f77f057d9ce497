"""``redis-streams://`` in a plain publisher that never imports celery_streams (issue #24).

``celery_streams.pth`` (written by setup.py into the wheel and the editable install)
imports ``_celery_streams_pth``, which registers the schemes when kombu.transport is
imported. Here a site directory holding that .pth stands for site-packages
(``site.addsitedir`` runs it as interpreter start does); tests/test_packaging.py
checks the installed wheel and the editable install.
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

import _celery_streams_pth as hook
from celery_streams import urls
from tests.workers import ROOT, clean_env

PUBLISHER = '''
import sys
from kombu import Connection
with Connection(%r, transport_options={'global_keyprefix': %r}) as conn:
    conn.SimpleQueue('plain').put({'hello': 'world'})
print('celery_streams imported first:', %r in sys.modules)
'''


@pytest.fixture
def site_dir(tmp_path):
    """A directory with ``celery_streams.pth`` as setup.py writes it, and the hook module."""
    line = re.search(r"^PTH_LINE = '(.*)'$", (ROOT / 'setup.py').read_text(), re.M)[1]
    where = tmp_path / 'site'
    where.mkdir()
    (where / 'celery_streams.pth').write_text(line.encode().decode('unicode_escape'))
    (where / '_celery_streams_pth.py').write_text((ROOT / '_celery_streams_pth.py').read_text())
    return where


def python(code, site=None, **env):
    """``python -c code`` with no celery_streams import; ``site``: a site dir run as at start."""
    if site is not None:
        code = 'import site; site.addsitedir(%r)\n' % str(site) + code
    return subprocess.run([sys.executable, '-c', code], env=dict(clean_env(), **env), cwd=ROOT / 'tests',
                          capture_output=True, text=True, timeout=60)


def test_the_hook_knows_the_schemes_of_the_package():
    assert hook.SCHEMES == urls.SCHEMES and hook.TRANSPORT == urls.TRANSPORT_PATH


def test_a_plain_publisher_on_redis_streams_works(redis_server, site_dir, unique_name):
    """With the .pth run at start it publishes; without it (or turned off), kombu's KeyError (what `import
    celery_streams` still fixes where the .pth is not run)."""
    url = 'redis-streams://127.0.0.1:%d/0' % redis_server.port
    done = python(PUBLISHER % (url, unique_name + ':', 'celery_streams'), site=site_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    stream = '%s:celery-streams:q:{plain}' % unique_name
    assert redis_server.client().xlen(stream) == 1
    # the venv running the tests may have the .pth installed too: turned off here
    without = python(PUBLISHER % (url, unique_name + ':', 'celery_streams'), CELERY_STREAMS_NO_PTH='1')
    assert without.returncode != 0 and "No such transport: redis-streams" in without.stderr, without.stderr


def test_the_hook_costs_no_import_and_can_be_turned_off(site_dir):
    code = ('import sys; print(sorted(m for m in sys.modules if m.startswith(("kombu", "celery"))))\n'
            'import kombu.transport as t; print(t.TRANSPORT_ALIASES.get("redis-streams"))\n'
            'hook = sys.modules["_celery_streams_pth"]\n'
            'print(type(t.__loader__).__name__, sys.meta_path.count(hook.Finder))')
    done = python(code, site=site_dir)
    assert done.returncode == 0 and done.stderr == '', done.stderr
    assert done.stdout.split('\n')[:3] == ['[]', urls.TRANSPORT_PATH, 'SourceFileLoader 0'], done.stdout
    off = python(code, site=site_dir, CELERY_STREAMS_NO_PTH='1')
    assert off.stdout.split('\n')[1] == 'None', off.stdout + off.stderr


def test_the_hook_registers_at_once_when_kombu_is_already_imported():
    code = ('import kombu.transport as t, _celery_streams_pth\n'
            'print(t.TRANSPORT_ALIASES.get("sentinel-streams"))')
    done = subprocess.run([sys.executable, '-c', code], env=dict(clean_env(), PYTHONPATH=str(ROOT)),
                          cwd=ROOT / 'tests', capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == urls.TRANSPORT_PATH, done.stdout + done.stderr


def test_a_broken_hook_never_stops_the_interpreter(site_dir):
    """A kombu.transport that fails to import fails as without the hook; the interpreter runs."""
    (site_dir / 'kombu').mkdir()
    (site_dir / 'kombu' / '__init__.py').write_text('')
    (site_dir / 'kombu' / 'transport.py').write_text('raise RuntimeError("broken kombu")\n')
    code = ('import sys; sys.path.insert(0, %r)\n'
            'print(sys.meta_path.count(sys.modules["_celery_streams_pth"].Finder))\n'
            'try:\n    import kombu.transport\nexcept RuntimeError as exc:\n    print("raised", exc)\n'
            % str(site_dir))
    done = python(code, site=site_dir)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split('\n')[:2] == ['1', 'raised broken kombu'], done.stdout + done.stderr
