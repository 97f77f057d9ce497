"""``celery streams exporter``: Prometheus metrics scraped from a real exporter process.

The exporter runs as ``celery -A tests.apps.e2e streams exporter --port 0``
(it prints the port it got); scrapes are parsed with prometheus_client's
parsers (text format 0.0.4, and OpenMetrics when asked for).
"""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import \
    text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from celery_streams import exporter, ledger
from tests.helpers import wait_until
from tests.workers import ROOT, Worker, app_env, celery_command

pytestmark = pytest.mark.one_server   # nothing here depends on the server kind

DOCS = ROOT / 'docs'
#: The families of the ledger's counters start with this (and end in a counter's name).
LEDGER_FAMILY = tuple('celery_streams_queue_' + name for name in ledger.COUNTERS)


class ExporterProcess:
    """``celery streams exporter`` in a subprocess; its stdout and stderr in files."""

    def __init__(self, env, *args):
        self.dir = Path(tempfile.mkdtemp(prefix='cs-exporter-'))
        with open(self.dir / 'out', 'wb') as out, open(self.dir / 'err', 'wb') as err:
            self.proc = subprocess.Popen(
                celery_command('streams', 'exporter', '--port', '0', *args), env=env, cwd=ROOT,
                stdout=out, stderr=err)
        found = wait_until(lambda: re.search(r'http://127\.0\.0\.1:(\d+)/metrics', self.out())
                           or self.proc.poll() is not None, timeout=60,
                           what=lambda: self.out() + self.err())
        assert self.proc.poll() is None, self.out() + self.err()
        self.port = int(found.group(1))

    def out(self):
        return (self.dir / 'out').read_text()

    def err(self):
        return (self.dir / 'err').read_text()

    def get(self, path='/metrics', method='GET', **headers):
        request = urllib.request.Request('http://127.0.0.1:%d%s' % (self.port, path),
                                         headers=headers, method=method)
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.headers['Content-Type'], reply.read().decode()

    def scrape(self) -> dict:
        """``{name: {labels tuple: value}}``; a family without samples is left out."""
        kind, text = self.get()
        assert kind == exporter.CONTENT_TYPE
        return parse(text)

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def parse(text: str, families=text_string_to_metric_families) -> dict:
    found = {}
    for fam in families(text):
        # ours: the ledger's counters are counters (samples named <family>_total), the rest
        # gauges; prometheus_client's process_* and python_info come with the server
        if fam.name.startswith('celery_'):
            assert fam.type == ('counter' if fam.name.startswith(LEDGER_FAMILY) else 'gauge'), fam
        for sample in fam.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def of(metrics, name, queue=None, **labels):
    """The value of ``name`` for queue ``queue`` (and ``labels``), None when not served."""
    if queue is not None:
        labels['queue_name'] = queue
    return metrics.get(name, {}).get(tuple(sorted(labels.items())))


@pytest.fixture
def exporters():
    started = []

    def start(env, *args):
        started.append(ExporterProcess(env, *args))
        return started[-1]

    yield start
    for process in started:
        process.stop(signal.SIGKILL)


def run_one_task(env):
    """A worker's consumer shows in XINFO CONSUMERS once it has read an entry."""
    done = subprocess.run(celery_command('call', 'tests.apps.e2e.add', '--args', '[1, 2]'), env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# -- a real exporter, a real worker ------------------------------------------------

def test_exporter_serves_waiting_pending_dead_letters_and_consumers(redis_server, prefix,
                                                                    streams_state, exporters):
    state = streams_state(redis_server, prefix)
    state.task_queue('emails', published=4, reserved=1, dead=1)   # 3 waiting, 1 held by us
    state.task_queue('idle', published=2)
    env = app_env(redis_server, prefix)
    worker = Worker(env, '-P', 'solo', '-Q', 'celery,quiet', name='w1').start()
    try:
        run_one_task(env)
        served = exporters(env, '--interval', '0')
        metrics = wait_until(lambda: (lambda m: of(m, 'celery_streams_queue_consumers', 'celery')
                                      and m)(served.scrape()), what='the worker in XINFO CONSUMERS')
        assert of(metrics, 'celery_streams_up') == 1
        assert of(metrics, 'celery_streams_last_scrape_error') == 0
        assert 0 <= of(metrics, 'celery_streams_scrape_duration_seconds') < 10
        assert of(metrics, 'celery_streams_queue_info', 'emails', kind='task') == 1
        emails = {name: of(metrics, name, 'emails') for name in (
            'celery_queue_length', 'celery_streams_queue_pending', 'celery_streams_queue_dead_letters',
            'celery_streams_queue_stream_length', 'celery_active_consumer_count',
            'celery_streams_queue_consumers', 'celery_streams_queue_lag')}
        assert emails == {
            'celery_queue_length': 3, 'celery_streams_queue_pending': 1,
            'celery_streams_queue_dead_letters': 1, 'celery_streams_queue_stream_length': 4,
            'celery_active_consumer_count': 1, 'celery_streams_queue_consumers': 1,
            # 5 entries added (the dead letter's too), 2 read
            'celery_streams_queue_lag': None if redis_server.name == 'redis6.2' else 3}
        assert of(metrics, 'celery_streams_consumer_pending', 'emails',
                  consumer=state.channel.consumer_name) == 1
        assert len(metrics['celery_streams_consumer_pending']) >= 2   # ours and the worker's
        assert of(metrics, 'celery_streams_queue_oldest_pending_age_seconds', 'emails') > 0
        assert of(metrics, 'celery_streams_queue_oldest_pending_age_seconds', 'idle') == 0
        assert (of(metrics, 'celery_queue_length', 'idle'),
                of(metrics, 'celery_active_consumer_count', 'idle')) == (2, 0)
        # the worker: one live consumer on the default queue, nothing left there
        assert (of(metrics, 'celery_queue_length', 'celery'),
                of(metrics, 'celery_active_consumer_count', 'celery'),
                of(metrics, 'celery_streams_queue_pending', 'celery')) == (0, 1, 0)
        [(labels, pending)] = [(dict(k), v) for k, v in metrics['celery_streams_consumer_pending'].items()
                               if dict(k)['queue_name'] == 'celery']
        assert labels['consumer'].startswith('w1@') and pending == 0
        # a queue the worker consumes and never read from: alive by its liveness key
        assert (of(metrics, 'celery_queue_length', 'quiet'),
                of(metrics, 'celery_active_consumer_count', 'quiet')) == (0, 1)
        assert worker.stop() == 0
        metrics = served.scrape()
        assert of(metrics, 'celery_active_consumer_count', 'celery') == 0
        assert of(metrics, 'celery_active_consumer_count', 'quiet') == 0
        assert of(metrics, 'celery_queue_length', 'emails') == 3
    finally:
        worker.stop()
    assert served.stop(signal.SIGINT) == 0   # Ctrl-C
    assert 'Exporter stopped.' in served.out() and served.err() == ''


def test_a_redis_that_is_down_gives_up_0_and_the_exporter_serves_on(fresh_redis_server, prefix,
                                                                    streams_state, exporters):
    server = fresh_redis_server()
    streams_state(server, prefix).task_queue('q', published=2)
    served = exporters(app_env(server, prefix), '--interval', '0')
    metrics = served.scrape()
    assert (of(metrics, 'celery_streams_up'), of(metrics, 'celery_queue_length', 'q')) == (1, 2)
    server.stop()
    for _ in range(2):   # said once on stderr, however many scrapes fail
        metrics = served.scrape()
        assert of(metrics, 'celery_streams_up') == 0
        assert of(metrics, 'celery_streams_last_scrape_error') == 1
        ours = {name for name in metrics if name.startswith('celery_')}
        assert ours == set(exporter.SCRAPE_METRICS)   # no queue metric
        assert 'process_cpu_seconds_total' in metrics
    [line] = served.err().splitlines()
    assert line.startswith('Collection failed: cannot reach Redis at redis-streams://127.0.0.1:%d/0: '
                           % server.port), line
    server.start()   # without persistence: empty
    metrics = served.scrape()
    assert (of(metrics, 'celery_streams_up'), of(metrics, 'celery_streams_last_scrape_error')) == (1, 0)
    assert 'answers again' in served.out()
    assert served.stop(signal.SIGTERM) == 0
    assert served.out().rstrip().endswith('Exporter stopped.')


def test_other_paths_and_a_busy_port(redis_server, prefix, exporters):
    env = app_env(redis_server, prefix)
    served = exporters(env)
    assert served.get('/')[1].startswith('celery_streams exporter')
    assert served.get(method='HEAD') == (exporter.CONTENT_TYPE, '')
    with pytest.raises(urllib.error.HTTPError) as caught:
        served.get('/nope')
    assert caught.value.code == 404
    with socket.socket() as busy:
        busy.bind(('127.0.0.1', 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(celery_command('streams', 'exporter', '--port', str(port)),
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert 'cannot listen on 127.0.0.1:%d: ' % port in line, line


# -- in-process: the cache, the format -------------------------------------------------

def test_collections_are_cached_for_the_interval(redis_server, prefix, streams_state):
    state = streams_state(redis_server, prefix)
    state.task_queue('q', published=1)
    cached = exporter.Exporter(state.redis, global_keyprefix=prefix, interval=3600)
    fresh = exporter.Exporter(state.redis, global_keyprefix=prefix, interval=0)
    assert of(parse(cached.metrics()), 'celery_queue_length', 'q') == 1
    state.task_queue('q', published=2)
    assert of(parse(cached.metrics()), 'celery_queue_length', 'q') == 1
    assert of(parse(fresh.metrics()), 'celery_queue_length', 'q') == 3


def test_label_values_and_help_are_escaped():
    """Queue and consumer names are label values as they are; prometheus_client escapes them."""
    fam = exporter.family('celery_streams_consumer_pending')
    odd = 'a"b\\c\nd{e}=,f'
    fam.add_metric([odd, 'plain'], 2)
    fam.add_metric(['', 'x'], 0.25)
    registry = CollectorRegistry()
    registry.register(Fixed([fam, exporter.family('celery_streams_queue_pending')]))
    text = generate_latest(registry).decode()
    assert 'celery_streams_queue_pending' not in text.replace('celery_streams_consumer_pending', '')
    assert 'queue_name="a\\"b\\\\c\\nd{e}=,f"' in text
    [parsed] = text_string_to_metric_families(text)
    assert parsed.documentation == exporter.METRICS['celery_streams_consumer_pending']
    assert [(s.labels, s.value) for s in parsed.samples] == [
        ({'queue_name': odd, 'consumer': 'plain'}, 2), ({'queue_name': '', 'consumer': 'x'}, 0.25)]


class Fixed:
    """A collector of fixed families, those with samples (as :class:`exporter.Exporter`)."""

    def __init__(self, families):
        self.families = families

    def collect(self):
        return [fam for fam in self.families if fam.samples]


def test_counters_keep_their_names_in_both_formats():
    """A counter family is named without ``_total`` (prometheus_client adds it): the text
    format 0.0.4 says ``..._total`` everywhere, OpenMetrics names the family without it;
    the samples are ``..._total`` in both."""
    fam = exporter.family('celery_streams_queue_acked_total')
    fam.add_metric(['q'], 3)
    registry = CollectorRegistry()
    registry.register(Fixed([fam]))
    text = generate_latest(registry).decode()
    assert text.splitlines() == [
        '# HELP celery_streams_queue_acked_total ' + exporter.COUNTER_HELP['acked'],
        '# TYPE celery_streams_queue_acked_total counter',
        'celery_streams_queue_acked_total{queue_name="q"} 3.0']
    om = openmetrics_latest(registry).decode()
    assert '# TYPE celery_streams_queue_acked counter' in om
    assert 'celery_streams_queue_acked_total{queue_name="q"} 3.0' in om
    assert om.endswith('# EOF\n')


def test_the_endpoint_answers_openmetrics_when_asked_with_process_metrics(
        redis_server, prefix, streams_state, exporters):
    streams_state(redis_server, prefix).task_queue('q', published=2)
    served = exporters(app_env(redis_server, prefix), '--interval', '0')
    kind, text = served.get(Accept='application/openmetrics-text; version=1.0.0; charset=utf-8')
    assert kind.startswith('application/openmetrics-text;'), kind
    assert text.endswith('# EOF\n')
    metrics = parse(text, openmetrics_families)
    assert of(metrics, 'celery_queue_length', 'q') == 2
    assert of(metrics, 'celery_streams_queue_published_total', 'q') == 2
    assert '# TYPE celery_streams_queue_published counter' in text
    assert of(metrics, 'process_cpu_seconds_total') > 0
    assert metrics['python_info']
    plain = served.scrape()   # no Accept header: the text format 0.0.4
    assert of(plain, 'process_cpu_seconds_total') > 0
    assert of(plain, 'celery_streams_queue_published_total', 'q') == 2


# -- the dashboard and the docs name what is served -----------------------------------

def dashboard_metric_names() -> set:
    doc = json.loads((DOCS / 'grafana-dashboard.json').read_text())
    exprs = []

    def walk(node):
        if isinstance(node, dict):
            exprs.extend(v for k, v in node.items() if k in ('expr', 'query', 'definition')
                         and isinstance(v, str))
            exprs.extend(v['query'] for k, v in node.items()
                         if k == 'query' and isinstance(v, dict) and 'query' in v)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(doc)
    assert exprs
    return {name for expr in exprs for name in re.findall(r'\bcelery_[a-z_]+\b', expr)}


def test_dashboard_and_docs_use_exactly_the_served_metrics(redis_server, prefix, streams_state):
    state = streams_state(redis_server, prefix)
    state.task_queue('q', published=3, reserved=1, dead=1)   # every queue and consumer metric
    served = set(parse(exporter.Exporter(state.redis, global_keyprefix=prefix).metrics()))
    if redis_server.name == 'redis6.2':
        served.add('celery_streams_queue_lag')   # served from Redis 7.0 on
    assert served == set(exporter.METRICS)
    used = dashboard_metric_names()
    assert used and used <= served, used - served
    for name in ('celery_queue_length', 'celery_streams_queue_pending', 'celery_active_consumer_count',
                 'celery_streams_queue_oldest_pending_age_seconds', 'celery_streams_queue_dead_letters',
                 'celery_streams_queue_lag'):
        assert name in used
    doc = (DOCS / 'metrics.md').read_text()
    documented = set(re.findall(r'^\| `(celery_[a-z_]+)`', doc, re.M))
    assert documented == served, (served - documented, documented - served)
    assert '`celery_streams_queue_scheduled`' in doc   # comes with delayed delivery, said so
    assert 'metrics' in (DOCS / 'index.md').read_text().split('```{toctree}')[1]


def test_the_ledger_is_served_as_counters_and_its_balance_as_a_gauge(redis_server, prefix, r, keys):
    """``celery_streams_queue_<counter>_total`` for every counter of every queue (``rate()`` of
    them is a throughput) and ``celery_streams_queue_unaccounted``: 0, then 1 once an entry
    was deleted behind the transport's back."""
    from kombu import Exchange, Queue

    from tests.helpers import connection, consume, publish

    q = Queue('work', Exchange('work'), 'work')
    with connection(redis_server, prefix) as conn:
        publish(conn, q.exchange, 'work', [{'n': i} for i in range(4)], declare=[q])
        consume(conn, q, 1, must=True)
    text = exporter.Exporter(r, global_keyprefix=prefix, interval=0).metrics()
    assert '# TYPE celery_streams_queue_published_total counter' in text
    metrics = parse(text)
    assert of(metrics, 'celery_streams_queue_published_total', 'work') == 4
    assert of(metrics, 'celery_streams_queue_acked_total', 'work') == 1
    assert of(metrics, 'celery_streams_queue_dead_lettered_total', 'work') == 0
    assert of(metrics, 'celery_streams_queue_unaccounted', 'work') == 0
    r.xdel(keys.stream('work'), r.xrange(keys.stream('work'))[0][0])
    metrics = parse(exporter.Exporter(r, global_keyprefix=prefix, interval=0).metrics())
    assert of(metrics, 'celery_streams_queue_unaccounted', 'work') == 1


def test_sigterm_while_scrapes_arrive_stops_the_exporter(redis_server, prefix, exporters):
    """SIGTERM lands while the main thread accepts scrapes (``socketserver`` catches ``Exception``
    around handing a request over): the exporter stops all the same, with status 0."""
    for _ in range(3):
        served = exporters(app_env(redis_server, prefix), '--interval', '60')
        going = threading.Event()

        def hammer(served, going):
            while not going.is_set():
                try:
                    served.get('/')
                except OSError:
                    return

        threads = [threading.Thread(target=hammer, args=(served, going), daemon=True) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        try:
            assert served.stop(signal.SIGTERM) == 0
        finally:
            going.set()
