"""Shared fixtures: private Redis / Valkey servers (see ``tests/servers.py``).

* ``redis_server`` -- one long-lived server per kind found on this machine
  (``redis7``, ``valkey8``, ``redis6.2``...); tests using it run once per kind.
  Never FLUSHALL it: use ``unique_name`` for keys and queues instead.
* ``tls_redis_server`` -- the same over TLS, skipped where unsupported.
* ``fresh_redis_server`` -- a factory for private servers a test may kill,
  restart or reconfigure; they are stopped at the end of the test.

``CELERY_STREAMS_TEST_SERVERS=redis7,valkey8`` narrows the matrix.

Without any server (none installed, or none left after that variable) the
tests that need one are skipped, saying why, and the tests of pure code
(``tests/test_pure.py``...) still run; in CI (``CI=true``) a missing server
stops the session instead. A test needs a server when it uses one of
:data:`SERVER_FIXTURES` (directly or through another fixture) or is marked
``needs_server``.
"""
from __future__ import annotations

import os
import secrets
import signal
import threading

import pytest

from tests import servers
from tests.servers import ClusterTopology, ClusterUnsupported, RedisServer, ServerBinary, TlsFiles
# Fixtures shared by the CLI and admin tests
from tests.kombu_state import run, state, streams_state  # noqa: F401

try:
    SERVERS = servers.available_servers()
    _DISCOVERY_ERROR = ""
except servers.NoServerFound as exc:
    SERVERS, _DISCOVERY_ERROR = [], str(exc)

#: Fixtures that start (or need) a server: a test using one is skipped without servers.
SERVER_FIXTURES = frozenset({
    "redis_server", "tls_redis_server", "fresh_redis_server", "preferred_server_binary",
    "celery_integration_server",   # tests/celery_integration/conftest.py
    "streams_server_url",          # the celery_streams.testing plugin's embedded server
})
#: Without servers, the parameter of ``redis_server`` / ``tls_redis_server`` (never set up).
_SERVER_PARAMS = SERVERS or [pytest.param(None, id="no-server")]


def in_ci() -> bool:
    """Whether this runs in CI (``CI=true``, as GitHub Actions, GitLab... set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _interrupt(signum, frame):
    """Treat SIGTERM like Ctrl-C: pytest stops and tears everything down."""
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    """In CI, abort early without servers; make SIGTERM run the cleanup."""
    config.addinivalue_line(
        "markers", "needs_server: skipped when no Redis/Valkey server is available")
    config.addinivalue_line(
        "markers", "one_server: runs on the preferred server kind only (see "
        "pytest_collection_modifyitems)")
    if _DISCOVERY_ERROR and in_ci():
        raise pytest.UsageError(_DISCOVERY_ERROR + " (CI=true: servers are required)")
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
        signal.signal(signal.SIGTERM, _interrupt)


def pytest_report_header(config):
    """Show which servers the session tests against."""
    if not SERVERS:
        return f"servers: none, tests that need one are skipped ({_DISCOVERY_ERROR})"
    return "servers: " + ", ".join(f"{s.name} ({s.path})" for s in SERVERS)


def pytest_collection_modifyitems(config, items):
    """Without servers, skip every test that needs one (see the module docstring).

    With several kinds, a test marked ``one_server`` (what it checks does not
    depend on the server: a pool, a CLI, packaging) runs on the preferred kind
    only (Redis 7 where available), so the matrix costs time only where the
    servers differ.
    """
    if SERVERS:
        preferred = servers.preferred_server("redis7").name
        keep, drop = [], []
        for item in items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            param = params.get("redis_server", params.get("cluster"))
            if item.get_closest_marker("one_server") and param is not None \
                    and getattr(param, "name", preferred) != preferred:
                drop.append(item)
            else:
                keep.append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep
        return
    skip = pytest.mark.skip(reason=f"needs a Redis/Valkey server: {_DISCOVERY_ERROR}")
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())) \
                or item.get_closest_marker("needs_server"):
            item.add_marker(skip, append=False)


def pytest_sessionfinish(session, exitstatus):
    """Stop every server still running, whatever happened."""
    servers.stop_all()


def _server_id(binary: ServerBinary) -> str:
    return binary.name


@pytest.fixture(scope="session")
def _server_pool():
    """Long-lived servers keyed by kind, so each kind starts only once."""
    pool: dict[str, RedisServer] = {}
    yield pool
    for server in pool.values():
        server.close()


def _pooled(pool: dict, key: str, **kwargs) -> RedisServer:
    """The pooled server ``key``, started (or revived) on demand."""
    if key not in pool:
        pool[key] = RedisServer(**kwargs)
    return pool[key].start()


@pytest.fixture(scope="session", params=_SERVER_PARAMS, ids=_server_id)
def redis_server(request, _server_pool) -> RedisServer:
    """A running server of each available kind, shared by the session."""
    binary: ServerBinary = request.param
    return _pooled(_server_pool, binary.name,
                   binary=binary.path, name=binary.name)


@pytest.fixture(scope="session")
def preferred_server_binary() -> ServerBinary:
    """Redis 7 where available, else the first kind found: for the modules that
    start private servers of their own (the Celery feature and fault suites)."""
    return servers.preferred_server("redis7")


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> TlsFiles:
    """A test CA and server certificate (skips without ``openssl``)."""
    if not servers.openssl_available():
        pytest.skip("openssl CLI not installed: no TLS tests")
    return servers.generate_tls_files(tmp_path_factory.mktemp("tls"))


def _require_tls(binary: ServerBinary, tls: TlsFiles) -> None:
    """Skip the test unless ``binary`` was built with TLS."""
    if not servers.supports_tls(binary.path, tls):
        pytest.skip(f"{binary.name} was built without TLS support")


@pytest.fixture(scope="session", params=_SERVER_PARAMS, ids=_server_id)
def tls_redis_server(request, _server_pool, tls_files) -> RedisServer:
    """Like ``redis_server`` but TLS only (``rediss://``, see ssl_kwargs)."""
    binary: ServerBinary = request.param
    _require_tls(binary, tls_files)
    return _pooled(_server_pool, f"{binary.name}-tls",
                   binary=binary.path, name=binary.name, tls=tls_files)


@pytest.fixture
def fresh_redis_server(request):
    """Factory ``make_server(name=None, *, tls=False, **kwargs)``.

    Starts a private server of kind ``name`` (default: the first available)
    and returns the running :class:`RedisServer`; ``kwargs`` go to it
    (``extra_args``, ``password``...).  Skips if ``name`` is not available.
    All servers made are closed when the test ends.
    """
    made: list[RedisServer] = []

    def make_server(name: str | None = None, *, tls: bool = False,
                    **kwargs) -> RedisServer:
        try:
            binary = servers.find_server(name)
        except servers.NoServerFound as exc:
            pytest.skip(str(exc))
        if tls:
            kwargs["tls"] = request.getfixturevalue("tls_files")
            _require_tls(binary, kwargs["tls"])
        server = RedisServer(binary=binary.path, name=binary.name, **kwargs)
        made.append(server)
        return server.start()

    yield make_server
    for server in made:
        server.close()


@pytest.fixture
def unique_name() -> str:
    """A short unique string for queue names and key prefixes."""
    return f"t{secrets.token_hex(5)}"


@pytest.fixture
def prefix(unique_name) -> str:
    """A ``global_keyprefix`` of this test's own: no test sees another's keys."""
    return unique_name + ":"


@pytest.fixture
def keys(prefix):
    """The transport's key schema under :func:`prefix`."""
    from celery_streams.keys import Keys
    return Keys(prefix)


@pytest.fixture
def r(redis_server):
    """A plain redis-py client of ``redis_server``, to look at what the transport wrote."""
    client = redis_server.client()
    yield client
    client.close()


try:   # each kind found; one older than 7.0, or without cluster support, is skipped saying why
    _CLUSTER_KINDS = servers.available_servers()
except servers.NoServerFound:
    _CLUSTER_KINDS = []


@pytest.fixture(scope="module", params=_CLUSTER_KINDS or [None], ids=lambda s: s.name if s else "no-server")
def cluster(request):
    """A Redis Cluster of 3 masters and 3 replicas on loopback, per server kind that runs one
    (Redis 7, Valkey 8), for the module."""
    if request.param is None:
        pytest.skip("no Redis/Valkey server of 7.0 or later")
    try:
        topology = ClusterTopology(request.param.path).start()
    except ClusterUnsupported as exc:
        pytest.skip(str(exc).splitlines()[0])
    yield topology
    topology.stop()


@pytest.fixture
def report(capsys, request, record_property):
    """``report(name=value, ...)``: print a test's figures (even without ``-s``) and record them
    in the JUnit XML."""
    def report(**figures):
        for name, value in figures.items():
            record_property(name, value)
        text = ", ".join("%s=%s" % (k, ("%.2fs" % v) if isinstance(v, float) else v)
                         for k, v in figures.items())
        with capsys.disabled():
            print("\n[%s] %s" % (request.node.name, text), flush=True)
    return report
