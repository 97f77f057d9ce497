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

``python3 run.py test`` runs the tests in 6 pytest-xdist processes, each with
servers of its own (ports: ``servers.free_port``); how they are shared out is
below, under "Parallel runs" (and in docs/testing.md).
"""
from __future__ import annotations

import os
import secrets
import signal
import threading
import warnings

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
    _reserve_embedded_ports()
    if hasattr(config, "workerinput"):   # a pytest-xdist worker
        config.pluginmanager.register(_XdistWorker(), "celery-streams-xdist-worker")


def _reserve_embedded_ports():
    """The embedded server of the ``celery_streams.testing`` plugin
    (``tests/test_testing_plugin.py``) takes its port from ``servers.free_port`` too:
    the kernel's choice (bind to port 0, close, start the server there) races with the
    other xdist workers' servers and with every client socket on the machine."""
    try:
        from celery_streams import embedded
    except ImportError:   # the package's own tests say why
        return
    if hasattr(embedded, "free_port"):
        embedded.free_port = servers.free_port


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


# --------------------------------------------------------------------------
# Parallel runs: ``python3 run.py test`` is ``pytest -n 6`` (pytest-xdist)
# --------------------------------------------------------------------------

#: Test files whose tests share a costly module-scoped fixture (a cluster, running
#: workers, a wheel built in the source tree). In an xdist run the tests of such a file
#: (``"file"``), or of such a file and one server kind (``"kind"``: the fixture is made
#: per kind), run in one worker, one after another: the fixture is set up as often as
#: in a serial run, and never twice at once. A file missing here is warned about
#: (``_XdistWorker``).
SHARED_FIXTURE_FILES = {
    "tests/test_cluster.py": "kind",           # cluster
    "tests/test_cluster_worker.py": "kind",    # cluster
    "tests/test_ledger_cluster.py": "kind",    # cluster
    "tests/test_unique_cluster.py": "kind",    # cluster
    "tests/test_rate_limits_cluster.py": "kind",   # cluster
    "tests/test_shards_cluster.py": "kind",    # cluster
    "tests/test_shards_worker.py": "kind",     # cluster
    "tests/test_celery_features.py": "kind",   # pair (two workers); smoke, per kind
    "tests/test_packaging.py": "file",         # dist, clean_venv: built in the tree
    "tests/test_topology.py": "kind",          # cluster, single
}
#: Module-scoped fixtures cheap enough to set up in each worker that needs them.
CHEAP_SHARED_FIXTURES = frozenset({"journal_server", "server"})

#: In an xdist run, the tests of these files are handed out first, in this order: a
#: long test handed out late would end alone and set the wall time. The others follow
#: in pytest's order. Celery's suite is one test of ~4 minutes, and none else takes
#: more than ~40 s. ``--no-loadscope-reorder``
#: (setup.cfg) keeps this order.
START_FIRST = (
    "tests/test_celery_integration.py",   # ~250 s: Celery's own suite, one pytest run
    "tests/test_celery_features.py",      # ~100 s: the tests sharing two workers
    "tests/test_packaging.py",            # ~40 s: a wheel, an sdist, a venv
    "tests/test_network.py",              # blackholes and slow links, ~20-40 s each
    "tests/test_cluster_worker.py",       # ~30 s per server kind
    "tests/test_shards_worker.py",        # ~60 s per server kind
    "tests/test_sentinel.py",             # failovers, ~25 s each
    "tests/test_faults.py",               # ~10-20 s each
)


def group_of(nodeid: str) -> str | None:
    """The group of the test ``nodeid`` (see :data:`SHARED_FIXTURE_FILES`), or
    ``None``: ``tests/test_cluster.py:redis7``, ``tests/test_packaging.py``."""
    path, _, rest = nodeid.partition("::")
    how = SHARED_FIXTURE_FILES.get(path)
    if how is None:
        return None
    if how == "kind" and rest.endswith("]") and "[" in rest:
        kinds = {binary.name for binary in SERVERS}
        for part in rest[rest.index("[") + 1:-1].split("-"):
            if part in kinds:
                return f"{path}:{part}"
    return path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` (setup.cfg), with the groups of :func:`group_of`: each is
    one unit of work, every other test is one of its own. (Not with ``xdist_group``
    marks: on pytest 9.2 pytest-xdist 3.8 no longer groups by them, pytest-xdist
    issue #1386.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid) or nodeid

    return SharedFixtureScheduling(config, log)


def _shared_fixtures(item) -> list[str]:
    """The costly module-scoped fixtures ``item`` uses (those not cheap)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return []
    shared = []
    for name in info.names_closure:
        defs = info.name2fixturedefs.get(name)
        if defs and defs[-1].scope in ("module", "class", "package") \
                and name not in CHEAP_SHARED_FIXTURES:
            shared.append(name)
    return shared


class _XdistWorker:
    """In each xdist worker (the same in all): the tests of :data:`START_FIRST` first;
    a warning for a file sharing a costly fixture but
    missing in :data:`SHARED_FIXTURE_FILES` (its tests would each set it up in their
    worker)."""

    @pytest.hookimpl(trylast=True)   # after pytest's own reordering (by fixture parameter)
    def pytest_collection_modifyitems(self, items):
        def rank(item):
            path = item.nodeid.split("::", 1)[0]
            return START_FIRST.index(path) if path in START_FIRST else len(START_FIRST)
        items.sort(key=rank)
        missing = {}
        for item in items:
            shared = _shared_fixtures(item)
            if shared and group_of(item.nodeid) is None:
                missing.setdefault(item.nodeid.split("::", 1)[0], set()).update(shared)
        for path, names in sorted(missing.items()):
            warnings.warn(pytest.PytestWarning(
                f"{path} shares module-scoped fixtures {sorted(names)}: add it to SHARED_FIXTURE_FILES"
                f" (or them to CHEAP_SHARED_FIXTURES) in tests/conftest.py"), stacklevel=1)


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


@pytest.fixture(autouse=True)
def _no_current_app_left_behind():
    """A Celery app a test made current (``Celery(...)`` does, unless
    ``set_as_current=False``) is not the next test's: the in-process ``celery`` CLI
    (``run``) takes the current app's settings, so a client app with Sentinel or
    prefix options left behind changes what a later test's command does (in an
    xdist worker, any test may come after any other)."""
    from celery import _state
    default, current = _state.default_app, _state._tls.current_app
    yield
    _state.set_default_app(default)
    _state._set_current_app(current)


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


#: The report section of a test's figures (see ``report``).
FIGURES = "figures"


@pytest.fixture
def report(capsys, request, record_property):
    """``report(name=value, ...)``: print a test's figures (even without ``-s``) and record them
    in the JUnit XML. In a pytest-xdist worker, whose output nobody sees, they go with the
    test's report to the main process, which prints them at the end (``_figures``)."""
    def report(**figures):
        for name, value in figures.items():
            record_property(name, value)
        text = ", ".join("%s=%s" % (k, ("%.2fs" % v) if isinstance(v, float) else v)
                         for k, v in figures.items())
        if hasattr(request.config, "workerinput"):
            request.node.add_report_section("call", FIGURES, text)
            return
        with capsys.disabled():
            print("\n[%s] %s" % (request.node.name, text), flush=True)
    return report


_figures: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    """In the main process of an xdist run: keep the figures the workers' tests reported."""
    if report.when != "call" or getattr(report, "node", None) is None:   # not from a worker:
        return                                                           # printed already
    for title, text in report.sections:
        if title == f"Captured {FIGURES} call":
            nodeid = report.nodeid
            if "@" in nodeid.rsplit("]", 1)[-1]:   # loadgroup's "@group" suffix
                nodeid = nodeid.rsplit("@", 1)[0]
            _figures.append((nodeid.split("::", 1)[-1], text))


def pytest_terminal_summary(terminalreporter):
    """The figures of the workers' tests, in the order they finished."""
    if _figures:
        terminalreporter.write_sep("-", "figures reported by tests")
        for nodeid, text in _figures:
            terminalreporter.write_line("[%s] %s" % (nodeid, text))
