"""``python -m benchmarks idle [--queues 1000] [--seconds 60]``: what an idle worker costs.

One ``celery worker -P prefork -c 2`` consumes ``--queues`` empty queues on a
private ``redis-server``; once it answers ``ping`` and has settled, its main
process' CPU (``/proc/<pid>/stat``) and Redis' (``INFO cpu``) are measured
over ``--seconds``, as % of one core, beside kombu's Redis transport.
"""
from __future__ import annotations

import argparse
import os
import time

from . import common
from .celery_workloads import Workers, make_app


def cpu_seconds(pid: int) -> float:
    with open('/proc/%d/stat' % pid) as stat:
        fields = stat.read().rpartition(')')[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')   # utime + stime


def redis_cpu(server) -> float:
    info = server.client().info('cpu')
    return info['used_cpu_user'] + info['used_cpu_sys']


def measure(broker, queues: int, seconds: float, settle: float = 10.0) -> dict:
    names = ','.join('csidle-%d' % i for i in range(queues))
    app = make_app(broker)
    group = Workers(broker, 1, names, 'csidle-' + broker.name.replace(' ', '-'))
    try:
        group.start(app, timeout=120)
        time.sleep(settle)   # startup reads and renewals settle
        pid = group.procs[0].pid
        worker0, redis0, began = cpu_seconds(pid), redis_cpu(broker.server), time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - began
        return {'worker_pct': (cpu_seconds(pid) - worker0) / elapsed * 100,
                'redis_pct': (redis_cpu(broker.server) - redis0) / elapsed * 100}
    finally:
        group.stop()
        app.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='python -m benchmarks idle')
    parser.add_argument('--queues', type=int, default=1000)
    parser.add_argument('--seconds', type=float, default=60.0)
    args = parser.parse_args(argv)
    common.snapshot_sources()
    server = common.RedisServer().start()
    try:
        brokers, _ = common.make_brokers(server, with_rabbit=False)
        print('| broker | worker main process, % of a core | Redis, % of a core |')
        print('|---|---|---|')
        for broker in brokers:
            server.flush()
            result = measure(broker, args.queues, args.seconds)
            print('| %s, %d idle queues | %.1f | %.1f |' % (broker.name, args.queues,
                                                         result['worker_pct'], result['redis_pct']),
                  flush=True)
    finally:
        server.stop()
    return 0
