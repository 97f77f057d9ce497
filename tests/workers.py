"""Real ``celery worker`` processes for end-to-end tests, and their environment.

* :func:`app_env` -- the environment of a ``celery`` process of one of the test
  apps in ``tests/apps/`` (broker, result backend or journal, key prefix);
* :func:`celery_command` -- ``python -m celery -A <app> ...``;
* :class:`Worker` -- one ``celery worker`` subprocess in a process group of its
  own, its output in a log file the tests wait on;
* :func:`flower` -- a ``celery flower`` subprocess, its base URL once it answers;
  :func:`flower_get` asks it, :func:`send_adds` gives it tasks to count.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from tests.helpers import backend_url, streams_url

ROOT = Path(__file__).resolve().parent.parent
HOST = socket.gethostname()
E2E_APP = 'tests.apps.e2e'

#: The environment variables each test app reads (broker URL, result backend or
#: journal URL, ``global_keyprefix``); ``tests.apps.defects`` is the e2e app plus tasks;
#: ``tests.apps.rig`` is the app of the rigs of ``tests/rigs.py``.
APP_SETTINGS = {
    'tests.apps.e2e': ('E2E_BROKER', 'E2E_BACKEND', 'E2E_PREFIX'),
    'tests.apps.defects': ('E2E_BROKER', 'E2E_BACKEND', 'E2E_PREFIX'),
    'tests.apps.delayed': ('E2E_BROKER', 'E2E_BACKEND', 'E2E_PREFIX'),
    'tests.apps.features': ('FEAT_BROKER', 'FEAT_BACKEND', 'FEAT_PREFIX'),
    'tests.apps.rig': ('RIG_BROKER', 'RIG_JOURNAL', 'RIG_PREFIX'),
}


def clean_env():
    """This process's environment without Celery settings, which would override an app's
    (a ``celery --broker`` run in-process leaves CELERY_BROKER_URL behind)."""
    return {k: v for k, v in os.environ.items() if not k.startswith('CELERY_')}


def output_until_ready(app: str, directory, *args: str) -> str:
    """What ``celery -A app worker -P solo -l info`` (run in ``directory``, which is on its
    path with the checkout) printed until it was ready, and while it stopped."""
    env = dict(clean_env(), PYTHONPATH='%s:%s' % (directory, ROOT))
    worker = subprocess.Popen([sys.executable, '-m', 'celery', '-A', app, 'worker', '-P', 'solo',
                               '-l', 'info', *args], cwd=directory, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in worker.stdout:
            lines.append(line)
            if 'ready.' in line:
                break
    finally:
        worker.terminate()
        lines += worker.communicate(timeout=30)[0].splitlines(keepends=True)
    return ''.join(lines)


def app_env(server, prefix, *, app=E2E_APP, broker=None, backend=None, **extra):
    """The environment of a ``celery -A app`` process on ``server`` under key prefix ``prefix``.

    The broker is ``broker`` (a URL), by default db 0 of ``server``; the result backend
    (the journal of ``tests.apps.rig``) is ``backend``, by default db 1 of ``server``
    (``server`` may be None when both are given). No inherited Celery settings
    (:func:`clean_env`), the repository on ``PYTHONPATH``, unbuffered output; ``extra``
    adds variables (values made strings).
    """
    broker_var, backend_var, prefix_var = APP_SETTINGS[app]
    env = clean_env()
    env.update({
        broker_var: broker or streams_url(server),
        backend_var: backend or backend_url(server),
        prefix_var: prefix,
        'PYTHONPATH': str(ROOT) + os.pathsep + env.get('PYTHONPATH', ''),
        'PYTHONUNBUFFERED': '1',
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


def stop_all(workers, timeout=15):
    """Stop each worker; kill the ones that do not stop within ``timeout`` seconds."""
    for worker in workers:
        try:
            worker.stop(timeout=timeout)
        except Exception:
            worker.kill()


def celery_command(*args, app=E2E_APP):
    return [sys.executable, '-m', 'celery', '-A', app, *args]


@contextmanager
def flower(env, app='tests.apps.flowerapp'):
    """``celery -A app flower`` on a free loopback port with ``env``, its API open; yields
    its base URL once ``/healthcheck`` answers, and stops it at the end."""
    from tests.servers import free_port
    port = free_port()
    env = dict(env, FLOWER_UNAUTHENTICATED_API='true')
    proc = subprocess.Popen([sys.executable, '-m', 'celery', '-A', app, 'flower',
                             '--port=%d' % port, '--address=127.0.0.1'], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = 'http://127.0.0.1:%d' % port
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(base + '/healthcheck', timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError('flower did not start:\n' + proc.communicate()[0][-3000:]) from None
            time.sleep(0.2)
    try:
        yield base
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def flower_get(base, path):
    """``(status, body)`` of Flower's answer to ``GET path``."""
    with urllib.request.urlopen(base + path, timeout=20) as response:
        return response.status, response.read().decode()


def send_adds(broker_url, transport_options, priorities):
    """``tests.apps.e2e.add`` once per priority of ``priorities``, from a client app of its own."""
    from celery import Celery
    app = Celery('client', broker=broker_url, set_as_current=False)
    app.conf.broker_transport_options = transport_options
    try:
        for priority in priorities:
            app.send_task('tests.apps.e2e.add', args=(1, 1), priority=priority)
    finally:
        app.close()


def _process_states(pgid):
    """``{pid: state letter}`` of the processes in process group ``pgid`` (Linux /proc;
    elsewhere the leader only, through ps)."""
    if not os.path.isdir('/proc/self'):
        out = subprocess.run(['ps', '-o', 'stat=', '-p', str(pgid)], capture_output=True,
                             text=True).stdout.strip()
        return {pgid: out[:1]} if out else {}
    states = {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % entry) as stat:
                fields = stat.read().rsplit(')', 1)[1].split()
        except OSError:   # gone meanwhile
            continue
        if int(fields[2]) == pgid:   # state, ppid, pgrp
            states[int(entry)] = fields[0]
    return states


class Worker:
    """One ``celery -A <app> worker`` subprocess (default app: ``tests.apps.e2e``), its log in a file.

    ``args`` follow ``worker -l info -n <name>@<host>``, so ``-l debug`` there wins.
    The worker runs in a process group of its own: :meth:`kill` and
    :meth:`signal_group` reach its pool processes too.
    """

    def __init__(self, env, *args, name='w1', app=E2E_APP):
        self.name = name
        self.app = app
        self.nodename = '%s@%s' % (name, HOST)
        self.log = Path(tempfile.mkdtemp(prefix='cs-worker-')) / ('%s.log' % name)
        self.args = ['worker', '-l', 'info', '-n', self.nodename, *args]
        self.env = env
        self.proc = None

    # -- lifecycle ------------------------------------------------------------

    def spawn(self):
        """Start the process; do not wait for it to be ready."""
        with open(self.log, 'wb') as out:
            self.proc = subprocess.Popen(celery_command(*self.args, app=self.app), env=self.env,
                                         cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self

    def start(self, timeout=60):
        """Start the process and wait until it logged ``ready.``."""
        self.spawn().wait_for('ready.', timeout)
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def terminate(self):
        """Ask for a warm shutdown (SIGTERM) without waiting."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout=30):
        """Wait for the process to end (kill its group after ``timeout``); its exit status."""
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.proc.returncode

    def stop(self, timeout=30):
        """Warm shutdown (SIGTERM); kill if it hangs. Returns the exit status."""
        self.terminate()
        return self.wait(timeout)

    def kill(self):
        """SIGKILL the whole process group (the pool processes too)."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def signal_group(self, sig):
        os.killpg(self.proc.pid, sig)

    def pause(self, timeout=10):
        """SIGSTOP the process group; return once every process of it is stopped."""
        self.signal_group(signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while True:
            states = {pid: s for pid, s in _process_states(self.proc.pid).items() if s not in 'ZX'}
            if states and all(state in 'Tt' for state in states.values()):
                return
            if time.monotonic() > deadline:
                raise AssertionError('%s not stopped after %ss: %s' % (self.name, timeout, states))
            time.sleep(0.01)

    def resume(self):
        self.signal_group(signal.SIGCONT)

    # -- the log --------------------------------------------------------------

    def text(self):
        return self.log.read_text(errors='replace')

    def count(self, needle):
        return self.text().count(needle)

    def taken_over(self):
        """Messages this worker took over from silent consumers (its reclaim log lines)."""
        return sum(int(n) for n in re.findall(r'took over (\d+) message', self.text()))

    def wait_for(self, needle, timeout=30):
        """Wait until the log holds ``needle`` (a string, or a compiled regular expression)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if needle.search(text) if isinstance(needle, re.Pattern) else needle in text:
                return
            if self.proc.poll() is not None:
                raise AssertionError('%s exited (%s) before %r:\n%s'
                                     % (self.name, self.proc.returncode, needle, self.text()[-4000:]))
            time.sleep(0.05)
        raise AssertionError('no %r in the log of %s after %ss:\n%s'
                             % (needle, self.name, timeout, self.text()[-4000:]))
