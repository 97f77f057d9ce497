"""The cost of waiting for a replica (issues #14, #22): ``python benchmarks/sentinel_wait.py``.

Not part of CI. Starts a Sentinel topology on loopback (a master, one replica,
three Sentinels: :class:`tests.servers.SentinelTopology`) and publishes small
messages one at a time through kombu, alternating runs of three settings:

* ``off``: ``sentinel-streams://`` with ``publish_wait_replicas=0`` (opted out);
* ``default``: ``sentinel-streams://`` with the default (``WAIT 1`` pipelined
  behind each write);
* ``one server``: ``redis-streams://`` straight to the master (no Sentinel: no
  ``WAIT`` by default),

on two paths:

* ``default``: the default exchange (a queue name as routing key): one ``XADD``;
* ``direct``: a direct exchange, the path of Celery's ``send_task``: the ``route``
  script.

Prints, per path and setting, the median over ``--rounds`` runs of the publish
rate and of the per-publish latency percentiles (p50, p99).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kombu import Connection, Exchange, Producer, Queue  # noqa: E402

import celery_streams  # noqa: E402,F401  (registers sentinel-streams://)
from tests.servers import SentinelTopology  # noqa: E402

MASTER = 'bench-master'


#: The settings compared: name, URL (of the topology), transport options.
SETTINGS = (
    ('off', lambda t: t.urls(), {'master_name': MASTER, 'publish_wait_replicas': 0}),
    ('default', lambda t: t.urls(), {'master_name': MASTER}),
    ('one server', lambda t: 'redis-streams://127.0.0.1:%d/0' % t.current_master().port, {}),
)


def run(topology, setting, path, count):
    _, url, options = setting
    options = dict(options, global_keyprefix='bench:')
    with Connection(url(topology), transport_options=options) as conn:
        channel = conn.default_channel
        exchange = Exchange('bench-direct', 'direct')
        queue = Queue('bench-%s' % path, exchange, 'rk')
        queue(channel).declare()
        producer = Producer(channel)
        target = {'exchange': exchange, 'routing_key': 'rk'} if path == 'direct' \
            else {'routing_key': queue.name}
        body = {'task': 'x', 'args': [1, 2]}
        for _ in range(50):   # warm up: scripts loaded, connection open
            producer.publish(body, **target)
        took = []
        started = time.perf_counter()
        for _ in range(count):
            sent = time.perf_counter()
            producer.publish(body, **target)
            took.append(time.perf_counter() - sent)
        elapsed = time.perf_counter() - started
        queue(channel).purge()
    took.sort()
    return count / elapsed, took[len(took) // 2] * 1e6, took[int(len(took) * 0.99)] * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--count', type=int, default=5000, help='publishes per run')
    parser.add_argument('--rounds', type=int, default=3)
    args = parser.parse_args(argv)
    with SentinelTopology(master_name=MASTER) as topology:
        print('redis-server %s, %s, %d publishes per run, median of %d runs'
              % (topology.servers[0].version, platform.platform(), args.count, args.rounds))
        print('%-8s %-12s %10s %10s %10s' % ('path', 'setting', 'publish/s', 'p50 us', 'p99 us'))
        for path in ('default', 'direct'):
            results: dict = {setting[0]: [] for setting in SETTINGS}
            for _ in range(args.rounds):
                for setting in SETTINGS:
                    results[setting[0]].append(run(topology, setting, path, args.count))
            for name, runs in results.items():
                rate, p50, p99 = (statistics.median(r[i] for r in runs) for i in range(3))
                print('%-8s %-12s %10.0f %10.0f %10.0f' % (path, name, rate, p50, p99), flush=True)


if __name__ == '__main__':
    main()
