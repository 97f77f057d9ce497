"""The rigs of the end-to-end fault and failover tests: one shape, a subclass per server kind.

A rig is a broker, a journal on a server outside it, a key prefix, and the real
``celery worker`` processes and client apps of one test. Workers run
``tests/apps/rig.py``: its task ``record`` lists every execution in the journal, so
killing, restarting or failing over the broker never touches the records, and a
test counts what was sent, run, lost and run twice.

* :class:`Rig` -- what every rig does: start workers, make client apps, read the journal;
* :class:`ServerRig` -- on one server (``tests/test_faults.py``);
* :class:`SentinelRig` -- on a :class:`~tests.servers.SentinelTopology` (``tests/test_sentinel.py``);
* :class:`ClusterRig` -- on a :class:`~tests.servers.ClusterTopology`
  (``tests/test_cluster_worker.py``), with queues placed on every master;
* :class:`Publisher` -- a thread publishing ``record`` tasks until stopped, noting when
  each publish began and returned;
* :func:`journal_server` -- the fixture of the journal's server, one a module (a test
  module takes it with ``journal_server = rigs.journal_server``).
"""
from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from celery import Celery

from celery_streams import errors
from celery_streams.keys import Keys
from tests import servers
from tests.apps.rig import ROUTED_QUEUES, journal_key
from tests.helpers import backend_url, streams_url
from tests.workers import Worker, app_env, stop_all

APP = 'tests.apps.rig'
RECORD = APP + '.record'
POISON = APP + '.poison'
#: Every rig's worker runs without mingle, gossip and heartbeats.
WORKER_FLAGS = ('--without-mingle', '--without-gossip', '--without-heartbeat')
#: A publish retried for up to ~10 s (Celery's default gives up after ~0.6 s): longer
#: than a failover of the Sentinel and cluster rigs (node timeout 1.5 s).
PUBLISH_RETRY = {'max_retries': 40, 'interval_start': 0, 'interval_step': 0.1, 'interval_max': 0.25}


@pytest.fixture(scope='module')
def journal_server(preferred_server_binary):
    """One server holding the journals of a module's tests, never damaged by a test."""
    binary = preferred_server_binary
    with servers.RedisServer(binary=binary.path, name=binary.name) as server:
        yield server


class Rig:
    """A broker, a journal, a prefix, and the workers and client apps of one test.

    ``settings`` are the worker settings of ``tests/apps/rig.py`` every worker of the rig
    gets (``vt=2`` is ``RIG_VT=2``); :meth:`worker` adds to them. A subclass says where
    the broker is (:meth:`broker_url`, :meth:`redis`). Closing the rig (or leaving its
    ``with`` block) stops its workers and closes its apps.
    """

    #: ``task_publish_retry_policy`` of the client apps (None: Celery's).
    publish_retry = None

    def __init__(self, journal_server, prefix, **settings):
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.settings = settings
        self.journal_url = backend_url(journal_server, db=0)
        self.journal = journal_server.client()
        self.workers, self.apps = [], []

    # -- the broker -----------------------------------------------------------

    def broker_url(self):
        raise NotImplementedError

    def transport_options(self):
        """The transport options of the client apps (the workers' come from their settings)."""
        return {'global_keyprefix': self.prefix}

    def redis(self, **kwargs):
        """A redis-py client of the broker."""
        raise NotImplementedError

    # -- workers and client apps ----------------------------------------------

    def worker_env(self, **settings):
        settings = {**self.settings, **settings}
        return app_env(None, self.prefix, app=APP, broker=self.broker_url(), backend=self.journal_url,
                       **{'RIG_' + name.upper(): value for name, value in settings.items()})

    def worker(self, *args, name='w1', queues=(), **settings):
        """A ``celery worker [-Q queues] args`` of the rig's app, once it is ready."""
        if queues:
            args = ('-Q', ','.join(queues), *args)
        worker = Worker(self.worker_env(**settings), *args, *WORKER_FLAGS, name=name, app=APP)
        self.workers.append(worker)
        return worker.start()

    def client_app(self, routes=False, **options):
        """A Celery app publishing to the broker; ``options`` add to its transport options,
        ``routes=True`` gives it the queues of the rig app's ``RIG_ROUTES=1``."""
        app = Celery('rig-client', broker=self.broker_url(), set_as_current=False)
        app.conf.broker_transport_options = {**self.transport_options(), **options}
        app.conf.task_ignore_result = True
        if self.publish_retry:
            app.conf.task_publish_retry_policy = self.publish_retry
        if routes:
            app.conf.task_queues = ROUTED_QUEUES
            app.conf.task_default_queue = 'direct_q'
        self.apps.append(app)
        return app

    # -- the journal ----------------------------------------------------------

    def listed(self, what):
        """The items of the journal list ``what`` (``ran``, ``started@<host>``...), in order."""
        return [item.decode() for item in self.journal.lrange(journal_key(what, self.prefix), 0, -1)]

    def ran(self) -> Counter:
        """How many times each token ran."""
        return Counter(self.listed('ran'))

    def run_times(self):
        """``[(time.time() of the run, token)]`` in order."""
        return sorted((float(t), token) for token, t in (x.split() for x in self.listed('at')))

    def longest_pause(self, start, end) -> float:
        """The longest stretch of ``[start, end]`` (``time.time()``) in which no task ran."""
        marks = [start] + [t for t, _ in self.run_times() if start < t < end] + [end]
        return max(b - a for a, b in zip(marks, marks[1:]))

    def wait_ran(self, tokens, timeout=30, what='ran'):
        """Wait until every token is listed under ``what`` (ran at least once); return the
        seconds it took, or None after ``timeout`` seconds."""
        tokens = set(tokens)
        started = time.monotonic()
        deadline = started + timeout
        while True:
            if not tokens - set(self.listed(what)):
                return time.monotonic() - started
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    # -- the end --------------------------------------------------------------

    def close(self):
        stop_all(self.workers)
        for app in self.apps:
            app.close()
        self.journal.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class ServerRig(Rig):
    """A rig on one server, ``broker`` (a :class:`~tests.servers.RedisServer`)."""

    def __init__(self, broker, journal_server, prefix, **settings):
        super().__init__(journal_server, prefix, **settings)
        self.broker = broker

    def broker_url(self):
        return streams_url(self.broker)

    def redis(self, **kwargs):
        return self.broker.client(**kwargs)


class SentinelRig(Rig):
    """A rig on a Sentinel topology: workers and client apps find master ``master`` through
    its Sentinels, and the client apps retry a publish through a failover."""

    publish_retry = PUBLISH_RETRY

    def __init__(self, topology, journal_server, prefix, master, **settings):
        super().__init__(journal_server, prefix, master=master, **settings)
        self.topology = topology
        self.master = master

    def broker_url(self):
        return self.topology.urls()

    def transport_options(self):
        return {**super().transport_options(), 'master_name': self.master}

    def redis(self, **kwargs):
        return self.topology.current_master().client(**kwargs)


class ClusterRig(Rig):
    """A rig on a Redis Cluster; :meth:`queues` names queues on every master, and the client
    apps retry a publish through a failover."""

    publish_retry = PUBLISH_RETRY

    def __init__(self, cluster, journal_server, prefix, **settings):
        super().__init__(journal_server, prefix, **settings)
        self.cluster = cluster

    def broker_url(self):
        return self.cluster.urls()

    def redis(self, **kwargs):
        return self.cluster.client(**kwargs)

    def queues(self, per_master=2, stem='q'):
        """Queue names, ``per_master`` on each master now (their hash tags decide where)."""
        wanted = {s.port: per_master for s in self.cluster.primaries()}
        names, i = [], 0
        while any(wanted.values()):
            name = '%s%s%d' % (self.prefix.rstrip(':'), stem, i)
            owner = self.master_of(name).port
            if wanted.get(owner):
                wanted[owner] -= 1
                names.append(name)
            i += 1
        return names

    def master_of(self, queue):
        return self.cluster.master_for(self.keys.stream(queue))

    def pending(self, queues) -> int:
        """Entries delivered and not acked, over every stream of ``queues``."""
        client = self.redis()
        try:
            return sum(client.xpending(stream, 'celery')['pending']
                       for queue in queues for stream in self.keys.streams(queue)
                       if client.exists(stream))
        finally:
            client.close()


class Publisher(threading.Thread):
    """Publishes ``record(token[, seconds])`` from ``app`` until stopped, or ``count`` of them.

    Tokens are ``<stem>0``, ``<stem>1``...; publish ``n`` goes with the ``send_task``
    options ``routes[n % len(routes)]`` and ``options``. After each publish the thread
    waits ``interval`` seconds (``pause_after_failure`` after one that raised, by
    default ``interval`` too). Every publish is noted in :attr:`published` as
    ``(token, began, returned, ok)`` (``time.monotonic()``), and each that raised in
    :attr:`failed` as ``(token, error in one line)``.
    """

    def __init__(self, app, *, interval=0.02, seconds=0.0, routes=({},), count=None, stem='p',
                 pause_after_failure=None, **options):
        super().__init__(daemon=True)
        self.app, self.interval, self.seconds, self.routes = app, interval, seconds, list(routes)
        self.count, self.stem, self.options = count, stem, options
        self.pause_after_failure = interval if pause_after_failure is None else pause_after_failure
        self.published = []     # (token, began, returned, ok)
        self.failed = []        # (token, error)
        self.stopping = threading.Event()

    def run(self):
        n = 0
        while not self.stopping.is_set() and (self.count is None or n < self.count):
            token = '%s%d' % (self.stem, n)
            args = (token, self.seconds) if self.seconds else (token,)
            began = time.monotonic()
            try:
                self.app.send_task(RECORD, args=args, **self.routes[n % len(self.routes)], **self.options)
            except Exception as exc:
                self.failed.append((token, errors.one_line(exc)))
                ok = False
            else:
                ok = True
            self.published.append((token, began, time.monotonic(), ok))
            n += 1
            self.stopping.wait(self.interval if ok else self.pause_after_failure)

    def stop(self):
        self.stopping.set()
        self.join(30)

    def tokens(self):
        """The tokens whose publish returned, in order."""
        return [token for token, _, _, ok in self.published if ok]

    def returned_after(self, moment):
        return [token for token, _, returned, ok in self.published if ok and returned > moment]

    def returned_between(self, start, end):
        return [token for token, _, returned, ok in self.published if ok and start < returned <= end]

    def began_after(self, moment):
        """The tokens whose publish began after ``moment`` and returned."""
        return [token for token, began, _, ok in self.published if ok and began > moment]

    def longest(self):
        """The longest a publish that returned took (seconds)."""
        return max((returned - began for _, began, returned, ok in self.published if ok), default=0.0)
