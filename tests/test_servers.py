"""Fast checks of the test-server infrastructure itself."""
import pytest
import redis

from tests import servers
from tests.servers import NO_RETRY, RedisServer


def test_server_answers_ping_and_reports_version(redis_server):
    with redis_server.client() as client:
        assert client.ping()
    assert redis_server.port != servers.FORBIDDEN_PORT
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.name.startswith(redis_server.flavor)
    major = redis_server.version.split(".")[0]
    assert redis_server.name.startswith(f"{redis_server.flavor}{major}")


def test_session_server_is_shared(redis_server, _server_pool):
    assert _server_pool[redis_server.name] is redis_server


def test_restart_keeps_port_args_and_dir(redis_server, fresh_redis_server):
    server = fresh_redis_server(
        redis_server.name,
        extra_args=["--appendonly", "yes", "--appendfsync", "always"])
    port = server.port
    server.client().set("k", "v")
    server.restart()
    assert server.port == port
    client = server.client(decode_responses=True)
    assert client.config_get("appendfsync") == {"appendfsync": "always"}
    assert client.get("k") == "v"          # AOF replayed from the same dir


def test_kill_then_restart(redis_server, fresh_redis_server):
    server = fresh_redis_server(redis_server.name)
    server.kill()
    assert not server.is_running()
    with pytest.raises(redis.ConnectionError):
        server.client(retry=NO_RETRY).ping()
    server.restart()
    assert server.client().ping()


def test_password(fresh_redis_server):
    server = fresh_redis_server(password="p@ss/word")
    assert server.client().ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=server.port, retry=NO_RETRY).ping()


def test_acl_user_limited_to_pattern(redis_server, unique_name):
    admin = redis_server.client()
    servers.create_acl_user(admin, unique_name, "pw",
                            key_patterns=[f"{unique_name}:*"],
                            commands=["+@all", "-@dangerous"])
    try:
        user = redis_server.client(url=redis_server.url_for(unique_name, "pw"))
        user.xadd(f"{unique_name}:stream", {"a": "1"})
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.set("elsewhere", "x")
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.flushall()
    finally:
        admin.acl_deluser(unique_name)


def test_tls_server_answers_over_rediss(tls_redis_server):
    assert tls_redis_server.url.startswith("rediss://127.0.0.1:")
    with tls_redis_server.client() as client:
        assert client.ping()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=tls_redis_server.port, socket_timeout=1,
                    retry=NO_RETRY).ping()


@pytest.mark.needs_server
def test_start_failure_shows_log_tail():
    server = RedisServer(extra_args=["--no-such-directive", "1"])
    with pytest.raises(servers.ServerStartError, match="no-such-directive"):
        server.start()
    server.close()


@pytest.mark.needs_server
def test_env_narrows_the_matrix(monkeypatch):
    first = servers.available_servers()[0]
    monkeypatch.setenv(servers.SERVERS_ENV, first.name)
    assert servers.available_servers() == [first]
    monkeypatch.setenv(servers.SERVERS_ENV, "redis99")
    with pytest.raises(servers.NoServerFound, match="redis99"):
        servers.available_servers()


def test_unique_name_is_short_and_unique(unique_name):
    assert len(unique_name) <= 12 and unique_name.isalnum()


def test_free_port_is_reserved_across_processes():
    """A port handed out here is never handed out by another process (another xdist
    worker, a nested pytest run) while this one lives, and lies outside the kernel's
    ephemeral range, where client sockets and port 0 land."""
    import subprocess
    import sys
    mine = {servers.free_port() for _ in range(20)}
    code = ("from tests import servers; "
            "print(' '.join(str(servers.free_port()) for _ in range(200)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    theirs = {int(port) for port in out.split()}
    assert len(mine) == 20 and len(theirs) == 200 and not mine & theirs
    span = servers.port_range()
    if span is not None:
        first, last = servers._ephemeral_range()
        for port in mine | theirs:
            assert span[0] <= port <= span[1] and not first <= port <= last
    assert servers.FORBIDDEN_PORT not in mine | theirs


def test_xdist_workers_start_in_slices_of_their_own(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "4")
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw2")
    assert servers._worker_slice(10000, 29999) == 20000
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    assert servers._worker_slice(10000, 29999) == 10000


@pytest.mark.needs_server
def test_first_start_on_a_port_taken_meanwhile_moves_to_another():
    """Someone outside free_port's reservations listens on the port before the server
    starts: the server takes another one. A restart keeps its port."""
    import socket
    server = RedisServer()
    taken = server.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        try:
            server.start()
            assert server.port != taken and server.client().ping()
            port = server.port
            server.restart()
            assert server.port == port
        finally:
            server.close()


@pytest.mark.needs_server
def test_parallel_runs_keep_the_tests_of_a_costly_fixture_together():
    """In an xdist run, a cluster's tests form one unit of work per server kind, the
    packaging tests (built in the source tree) one; other tests are units of their own
    (tests/conftest.py)."""
    from tests.conftest import group_of
    kind = servers.available_servers()[0].name
    assert group_of(f"tests/test_cluster.py::test_x[{kind}]") == f"tests/test_cluster.py:{kind}"
    assert group_of(f"tests/test_cluster_worker.py::test_y[{kind}-kill-master]") \
        == f"tests/test_cluster_worker.py:{kind}"
    assert group_of("tests/test_packaging.py::test_z[redis7]") == "tests/test_packaging.py"
    assert group_of(f"tests/test_bounded_drain.py::test_w[{kind}]") is None
    assert group_of(f"tests/test_transport.py::test_v[{kind}]") is None
