"""Celery's own integration tests (``t/integration/test_tasks.py`` and
``test_inspect.py`` of Celery 5.7.0, vendored in ``tests/celery_integration/``),
run against this transport with a real worker.

They need a pytest process of their own (Celery runs them that way): their
in-process session worker lives until the session ends, and would share this
process with the other suites' workers. So the whole suite does not collect
them; this test runs ``pytest tests/celery_integration`` and passes when that run
does (known failures are xfail there, see ``tests/celery_integration/conftest.py``).
Run that command directly to see or select single tests.

Once per suite, on one private server (the first kind available): ~4 minutes.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Seconds for the whole run; each of its tests has its own limit (90 s at most).
RUN_TIMEOUT = 1500


def _env():
    """This environment, less what would change the inner run: Celery settings
    (CELERY_STREAMS_* are kept: they choose the servers) and pytest's own."""
    return {k: v for k, v in os.environ.items()
            if not (k.startswith('CELERY_') and not k.startswith('CELERY_STREAMS_'))
            and k not in ('PYTEST_ADDOPTS', 'PYTEST_CURRENT_TEST', 'TEST_BROKER', 'TEST_BACKEND')}


def _stop(proc):
    """SIGTERM the run's process group (its conftest then stops its servers), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            pass


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_celery_integration_suite(tmp_path):
    log = tmp_path / 'celery-integration.log'
    command = [sys.executable, '-m', 'pytest', 'tests/celery_integration', '-q', '-rfEX',
               '-p', 'no:cacheprovider', '--durations=5']
    with open(log, 'wb') as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = proc.wait(RUN_TIMEOUT)
        except BaseException:   # timeout, Ctrl-C, pytest-timeout
            _stop(proc)
            raise
    output = log.read_text(errors='replace')
    print(output[-6000:])   # shown with -rP, or -s
    assert returncode == 0, ('`%s` exited with %d:\n%s'
                             % (' '.join(command[1:]), returncode, output[-20000:]))
