"""The guard of a test session: it cleans up after a pytest process that died without doing so.

:mod:`celery_streams.testing` starts one guard per session
(``python -m celery_streams.testing_guard '<json>'``, in a session of its own so
a Ctrl-C or a signal to pytest's process group does not reach it) and holds
the write end of its stdin. At a clean end the plugin writes ``done`` and the
guard exits doing nothing. When pytest dies first -- ``SIGKILL``, pytest-timeout's
``thread`` method (``os._exit``), an OOM kill -- the guard sees its stdin close
(or its parent change) and does what the session's teardown would have done:

* ``pid``: stop the embedded server (``SIGTERM``; it may already be gone, see
  :func:`celery_streams.embedded.die_with_parent`);
* ``dir``: remove the server's temporary directory;
* ``url`` and ``prefix``: delete every key of the session's prefix on that server
  (a server of the user's, ``CELERY_STREAMS_TEST_URL``).
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time

#: How often the guard checks that its parent still lives (seconds).
POLL = 0.5


def start(job: dict) -> subprocess.Popen:
    """Start a guard for ``job`` (keys: ``pid``, ``dir``, ``url``, ``prefix``; all optional)."""
    return subprocess.Popen([sys.executable, '-m', 'celery_streams.testing_guard', json.dumps(job)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def release(guard: subprocess.Popen) -> None:
    """The session cleaned up itself: the guard exits without doing anything."""
    try:
        assert guard.stdin is not None
        guard.stdin.write(b'done\n')
        guard.stdin.close()
    except (BrokenPipeError, OSError):
        pass
    try:
        guard.wait(5)
    except subprocess.TimeoutExpired:
        guard.kill()
        guard.wait()


def wait_for_parent(parent: int) -> bool:
    """Block until the parent says ``done`` (True) or dies (False)."""
    fd = sys.stdin.fileno()
    received = b''
    while True:
        ready, _, _ = select.select([fd], [], [], POLL)
        if ready:
            chunk = os.read(fd, 64)
            if not chunk:
                return received.startswith(b'done')
            received += chunk
        elif os.getppid() != parent:
            return False


def stop_server(pid: int) -> None:
    """SIGTERM the server, SIGKILL it if it still runs after 10 s."""
    deadline = time.monotonic() + 10
    sig = signal.SIGTERM
    while True:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        time.sleep(0.1)
        try:   # our child only if the parent died and we were made the reaper: reap it
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def remove_keys(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (the transport's and the result backend's)."""
    from . import admin
    from .connection import client_from_url
    client = client_from_url(url)
    try:
        admin.nuke(client, global_keyprefix=prefix)
        left = list(client.scan_iter(match=prefix + '*', count=1000))
        if left:
            client.delete(*left)
    finally:
        client.close()


def clean(job: dict) -> None:
    """Undo what the dead session left: its server, its directory, its keys."""
    if job.get('pid'):
        stop_server(job['pid'])
    if job.get('dir'):
        shutil.rmtree(job['dir'], ignore_errors=True)
    if job.get('url') and job.get('prefix'):
        remove_keys(job['url'], job['prefix'])


def main(argv: list[str]) -> int:
    """``python -m celery_streams.testing_guard '<json job>'``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    job = json.loads(argv[1])
    if not wait_for_parent(os.getppid()):
        clean(job)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
