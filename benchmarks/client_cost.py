"""``python -m benchmarks client-cost [--code DIR] [--repeat N]``: CPU per message, client and Redis.

Where the time of a publish or of a consumed message goes, on one private
``redis-server``, one process, no worker: messages/s, the client's CPU per
message (``time.process_time``) and Redis' (``INFO cpu``). ``--code DIR``
measures the ``celery_streams`` package of another checkout (a ``git worktree``
of an older commit), so that a change is measured before and after in the same
minute. Workloads:

* ``publish``: ``Producer.publish`` through a direct exchange (``route`` script),
  one by one; with ``publish_confirm='later'`` too, where the code knows it;
* ``consume 1 / 100 queues``: one ``Consumer`` (prefetch 100) drains and acks
  20,000 pre-filled messages spread over 1 or 100 queues; the clock runs from
  before ``basic_consume`` to after the consumer is cancelled.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid


def parse(argv):
    parser = argparse.ArgumentParser(prog='python -m benchmarks client-cost')
    parser.add_argument('--code', help='import celery_streams from this checkout instead')
    parser.add_argument('--repeat', type=int, default=3, help='runs of each workload (median)')
    parser.add_argument('--messages', type=int, default=20_000)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.code:
        sys.path.insert(0, args.code)
    from kombu import Connection, Consumer, Exchange, Producer, Queue

    import celery_streams
    from celery_streams.options import Options

    from .common import RedisServer, body

    server = RedisServer().start()
    url = 'redis-streams://127.0.0.1:%d/0' % server.port
    later = 'publish_confirm' in {f for f in Options.__dataclass_fields__}
    print('celery_streams from %s' % celery_streams.__file__.rsplit('/', 2)[0])

    def cpu():
        info = server.client().info('cpu')
        return time.process_time(), info['used_cpu_user'] + info['used_cpu_sys']

    def measure(n, run, flush=True):
        if flush:
            server.flush()
        (client0, redis0), began = cpu(), time.perf_counter()
        run()
        elapsed = time.perf_counter() - began
        client1, redis1 = cpu()
        return n / elapsed, (client1 - client0) / n * 1e6, (redis1 - redis0) / n * 1e6

    def publish(options):
        def run():
            name = 'cc-' + uuid.uuid4().hex[:8]
            queue = Queue(name, Exchange(name), name)
            with Connection(url, transport_options=options) as conn:
                producer = Producer(conn.default_channel)
                queue(conn.default_channel).declare()
                for i in range(args.messages):
                    producer.publish(body(i), exchange=queue.exchange, routing_key=name,
                                     serializer='json')
        return run

    def consume(count):
        tag = uuid.uuid4().hex[:8]
        queues = [Queue('cc-%s-%d' % (tag, i), Exchange('cc-%s-%d' % (tag, i)), 'cc-%s-%d' % (tag, i))
                  for i in range(count)]
        state = {}

        def fill():
            conn = state['conn'] = Connection(url)
            producer = Producer(conn.default_channel)
            for queue in queues:
                queue(conn.default_channel).declare()
            with producer.batch(max_size=1000):
                for i in range(args.messages):
                    producer.publish(body(i), exchange='', routing_key=queues[i % count].name,
                                     serializer='json')

        def run():
            conn, got = state['conn'], [0]

            def on_message(_body, message):
                message.ack()
                got[0] += 1

            with Consumer(conn.channel(), queues, callbacks=[on_message], prefetch_count=100,
                          accept=['json']):
                while got[0] < args.messages:
                    conn.drain_events(timeout=5)
            conn.release()
        return fill, run

    workloads = [('publish', publish({}))]
    if later:
        workloads.append(("publish, publish_confirm='later'", publish({'publish_confirm': 'later'})))
    for count in (1, 100):
        workloads.append(('consume + ack, %d queue%s' % (count, 's' if count > 1 else ''), consume(count)))
    print('| workload | msg/s | client CPU µs/msg | Redis CPU µs/msg |')
    print('|---|---|---|---|')
    try:
        for label, work in workloads:
            results = []
            for _ in range(args.repeat):
                if isinstance(work, tuple):
                    fill, run = work
                    server.flush()
                    fill()
                    results.append(measure(args.messages, run, flush=False))
                else:
                    results.append(measure(args.messages, work))
            rate, client, redis = (statistics.median(r[i] for r in results) for i in range(3))
            print('| %s | %s | %.1f | %.1f |' % (label, '{:,.0f}'.format(rate), client, redis), flush=True)
    finally:
        server.stop()
    return 0
