"""Move the messages waiting in kombu's Redis lists into celery_streams.

Usage: python move_kombu_lists.py redis://host:6379/0 celery [other queues...]
Run it after the last publisher switched to celery_streams.
"""
import base64
import json
import sys

import redis
from kombu import Connection, Producer

import celery_streams  # noqa: F401  (registers redis-streams://)

SEP = '\x06\x16'           # kombu's Redis transport: '<queue>\x06\x16<priority>'
STEPS = (0, 3, 6, 9)        # kombu's priority_steps (use yours)
PREFIX = ''                 # kombu's global_keyprefix, if you set one
SKIP = {'delivery_info', 'delivery_tag', 'body_encoding', 'priority', 'delivery_mode'}


def list_keys(queue):
    """kombu's lists of ``queue``, highest priority (step 0) first."""
    return [PREFIX + queue + (SEP + str(step) if step else '') for step in STEPS]


def republish(producer, queue, raw):
    envelope = json.loads(raw)
    properties = envelope['properties']
    body = envelope['body']
    if properties.get('body_encoding') == 'base64':
        body = base64.b64decode(body)
    producer.publish(
        body, exchange='', routing_key=queue,
        content_type=envelope.get('content-type'),
        content_encoding=envelope.get('content-encoding'),
        headers=envelope.get('headers') or {},
        priority=properties.get('priority'),
        delivery_mode=properties.get('delivery_mode'),
        **{k: v for k, v in properties.items() if k not in SKIP})


def move(url, queues):
    source = redis.Redis.from_url(url)
    moved = 0
    with Connection(url.replace('redis://', 'redis-streams://', 1)) as conn:
        producer = Producer(conn)
        for queue in queues:
            for key in list_keys(queue):
                moving = key + ':moving'   # holds the one message in flight
                while True:
                    raw = source.lindex(moving, -1) or source.lmove(key, moving, 'RIGHT', 'LEFT')
                    if raw is None:
                        break
                    republish(producer, queue, raw)
                    source.rpop(moving)
                    moved += 1
    return moved


if __name__ == '__main__':
    print('moved %d messages' % move(sys.argv[1], sys.argv[2:]))
