"""Real ``celery worker`` processes for end-to-end tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def streams_url(server, db=0):
    return 'redis-streams://127.0.0.1:%d/%d' % (server.port, db)


def clean_env():
    """This process's environment without Celery settings, which would override an app's
    (a ``celery --broker`` run in-process leaves CELERY_BROKER_URL behind)."""
    return {k: v for k, v in os.environ.items() if not k.startswith('CELERY_')}


def app_env(server, prefix, **extra):
    env = clean_env()
    env.update({
        'E2E_BROKER': streams_url(server),
        'E2E_BACKEND': 'redis://127.0.0.1:%d/1' % server.port,
        'E2E_PREFIX': prefix,
        'PYTHONPATH': str(ROOT) + os.pathsep + env.get('PYTHONPATH', ''),
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


def celery_command(*args):
    return [sys.executable, '-m', 'celery', '-A', 'tests.apps.e2e', *args]


class Worker:
    """One ``celery -A tests.apps.e2e worker`` subprocess, its log in a file."""

    def __init__(self, env, *args, name='w1'):
        self.log = Path(tempfile.mkdtemp(prefix='cs-worker-')) / 'worker.log'
        self.args = ['worker', '-l', 'info', '-n', '%s@%%h' % name, *args]
        self.env = env
        self.proc = None

    def start(self, timeout=60):
        with open(self.log, 'wb') as out:
            self.proc = subprocess.Popen(celery_command(*self.args), env=self.env, cwd=ROOT,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.wait_for('ready.', timeout)
        return self

    def text(self):
        return self.log.read_text(errors='replace')

    def wait_for(self, needle, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text():
                return
            if self.proc.poll() is not None:
                raise AssertionError('worker exited (%s) before %r:\n%s'
                                     % (self.proc.returncode, needle, self.text()[-4000:]))
            time.sleep(0.05)
        raise AssertionError('no %r in the worker log after %ss:\n%s'
                             % (needle, timeout, self.text()[-4000:]))

    def stop(self, timeout=30):
        """Warm shutdown (SIGTERM); kill if it hangs."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
