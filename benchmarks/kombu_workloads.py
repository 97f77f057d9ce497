"""Plain kombu workloads: publish, batch publish, consume+ack, many queues, backlog.

Every queue is set up the way Celery sets up its queues: a direct exchange of
the same name, bound with the queue name as routing key; bodies are JSON of
about 300 bytes.
"""
from __future__ import annotations

import time
import uuid

from kombu import Consumer, Exchange, Producer, Queue

from .common import body, wait_until

PREFETCH = 100


def make_queues(count=1):
    tag = uuid.uuid4().hex[:8]
    return [Queue('csbench-%s-%d' % (tag, i), Exchange('csbench-%s-%d' % (tag, i), 'direct'),
                  routing_key='csbench-%s-%d' % (tag, i)) for i in range(count)]


def queue_size(channel, queue):
    if hasattr(channel, '_size'):            # kombu's virtual transports
        return channel._size(queue.name)
    return channel.queue_declare(queue=queue.name, passive=True).message_count


def wait_for_sizes(channel, queues, expected, timeout=120):
    wait_until(lambda: sum(queue_size(channel, q) for q in queues) >= expected,
               timeout, what='%d messages in the queues' % expected)


def publish(producer, queues, n, start=0, direct=True):
    """Publish ``n`` bodies round-robin over ``queues``: through their direct exchange,
    or (``direct=False``) through the default exchange straight to the queue."""
    for i in range(start, start + n):
        queue = queues[i % len(queues)]
        producer.publish(body(i), exchange=queue.exchange if direct else '',
                         routing_key=queue.routing_key if direct else queue.name,
                         serializer='json')


def fill(conn, queues, n):
    """Put ``n`` messages in ``queues`` (not timed; batched where the transport can)."""
    channel = conn.channel()
    producer = Producer(channel)
    for queue in queues:
        queue(channel).declare()
    with producer.batch(max_size=1000):
        publish(producer, queues, n, direct=False)
    wait_for_sizes(channel, queues, n)
    return channel


def cleanup(conn, queues):
    try:
        channel = conn.channel()
        for queue in queues:
            queue(channel).delete()
            queue.exchange(channel).delete()
    except Exception:
        pass


def run_publish(broker, n, batch=False):
    """Messages/s through Producer.publish (or inside Producer.batch()) into one queue.

    The clock stops once the broker reports all ``n`` messages in the queue
    (an AMQP publish does not wait for the broker, a Redis one does).
    """
    queues = make_queues(1)
    with broker.connection() as conn:
        channel = conn.channel()
        producer = Producer(channel)
        queues[0](channel).declare()
        batched = producer.supports_batch_publish and hasattr(channel, 'create_publish_batch')
        before = broker.redis.snapshot() if broker.redis else None
        start = time.perf_counter()
        if batch:
            with producer.batch(max_size=1000):
                publish(producer, queues, n)
        else:
            publish(producer, queues, n)
        wait_for_sizes(channel, queues, n)
        elapsed = time.perf_counter() - start
        work = broker.redis.work_since(before, n) if broker.redis else {}
        cleanup(conn, queues)
    result = {'rate': n / elapsed, **work}
    if batch:
        result['batched'] = bool(batched)
    return result


def run_consume(broker, n, queue_count=1, prefetch=PREFETCH):
    """Messages/s drained (and acked one by one) from pre-filled queues by one Consumer."""
    queues = make_queues(queue_count)
    with broker.connection() as conn:
        fill(conn, queues, n)
        received = 0

        def on_message(_body, message):
            nonlocal received
            message.ack()
            received += 1

        channel = conn.channel()
        before = broker.redis.snapshot() if broker.redis else None
        start = time.perf_counter()   # py-amqp may deliver while basic_consume waits for its reply
        with Consumer(channel, queues, callbacks=[on_message], prefetch_count=prefetch,
                      accept=['json']):
            deadline = time.monotonic() + 300
            while received < n and time.monotonic() < deadline:
                conn.drain_events(timeout=5)
            elapsed = time.perf_counter() - start
        work = broker.redis.work_since(before, n) if broker.redis else {}
        cleanup(conn, queues)
    if received < n:
        raise RuntimeError('received %d of %d messages' % (received, n))
    return {'rate': n / elapsed, **work}


def run_backlog(broker, total, slice_size, log):
    """Publish ``total`` messages into one unconsumed queue in slices; rate and memory per slice.

    Publishes go through Producer.batch() (pipelined where the transport can), so
    the rate shows the server-side cost of a growing queue rather than round trips.
    """
    queues = make_queues(1)
    server = broker.redis
    rows = []
    with broker.connection() as conn:
        channel = conn.channel()
        producer = Producer(channel)
        queues[0](channel).declare()
        baseline = server.used_memory()
        for start in range(0, total, slice_size):
            began = time.perf_counter()
            with producer.batch(max_size=1000):
                publish(producer, queues, slice_size, start, direct=False)
            rate = slice_size / (time.perf_counter() - began)
            count = start + slice_size
            per_message = (server.used_memory() - baseline) / count
            rows.append({'backlog': count, 'rate': rate, 'bytes_per_msg': per_message})
            log('    %-15s backlog %7d: %.0f msg/s, %.0f bytes/msg'
                % (broker.name, count, rate, per_message))
        if queue_size(channel, queues[0]) != total:
            raise RuntimeError('queue holds %d, expected %d' % (queue_size(channel, queues[0]), total))
        cleanup(conn, queues)
    return rows
