#!/usr/bin/env python3
"""Newcomer entry point: ``python3 run.py demo`` and ``python3 run.py test``.

Creates ``.venv`` next to this file on first use, installs the package with its
test extra into it (again whenever setup.cfg changes), then runs the demo or
the test suite inside it. Extra arguments go to the demo or to pytest.

The tests run in TEST_WORKERS pytest-xdist processes (``-n``), more than the
cores: they mostly wait (real workers, failovers, sleeps). ``-n0`` (or
``CELERY_STREAMS_TEST_WORKERS=0``) runs them in this process, one at a time,
as do ``--pdb`` and ``--trace``; ``-n N`` / ``--numprocesses`` / ``--tx`` given
are pytest's as they are.
"""
import hashlib
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / '.venv'
PYTHON = VENV / ('Scripts/python.exe' if os.name == 'nt' else 'bin/python')
STAMP = VENV / '.celery-streams-installed'
#: pytest-xdist workers of ``run.py test`` (measured on 2 cores: docs/testing.md).
TEST_WORKERS = 6
WORKERS_ENV = 'CELERY_STREAMS_TEST_WORKERS'


def ensure_environment():
    wanted = hashlib.sha256((ROOT / 'setup.cfg').read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted and PYTHON.exists():
        return
    if not PYTHON.exists():
        print('run.py: creating %s' % VENV, flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print('run.py: installing celery-streams and its test tools into .venv', flush=True)
    pip = [str(PYTHON), '-m', 'pip', 'install', '--disable-pip-version-check', '-q']
    subprocess.run(pip + ['--upgrade', 'pip'], check=True)
    subprocess.run(pip + ['-e', '%s[test]' % ROOT], check=True)
    STAMP.write_text(wanted)


def pytest_args(args):
    """``args`` with ``-n TEST_WORKERS`` first, unless they choose themselves."""
    own = ('-n', '--numprocesses', '--tx', '--pdb', '--trace')
    if any(arg.split('=', 1)[0] in own or re.fullmatch(r'-n\S+', arg) or arg.endswith('no:xdist')
           for arg in args):
        return list(args)
    workers = os.environ.get(WORKERS_ENV, '').strip() or str(TEST_WORKERS)
    return ['-n', workers, *args]


def main(argv):
    commands = {'demo': ['-m', 'celery_streams.demo'], 'test': ['-m', 'pytest']}
    if not argv or argv[0] not in commands:
        print('usage: python3 run.py demo [--url redis://...] | test [pytest args]', file=sys.stderr)
        return 2
    ensure_environment()
    os.chdir(ROOT)
    args = pytest_args(argv[1:]) if argv[0] == 'test' else argv[1:]
    return subprocess.call([str(PYTHON), *commands[argv[0]], *args])


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
