"""How many messages wait in a queue: kombu's message count, Flower's queue lengths.

A queue's depth is what no consumer received yet, over every priority bucket:
each stream's length less its pending entries (delivered, not acked), from
``XLEN`` and the ``XPENDING`` summary, for any number of queues in one round
trip (one per master on a cluster).
"""
from __future__ import annotations

from .keys import Keys


def queue_depth(client, keys: Keys, group: str, queue: str) -> int:
    """Messages of ``queue`` no consumer received yet, over every priority bucket, in one round
    trip (kombu's ``queue_declare(passive=True).message_count``)."""
    return queue_depths(client, keys, group, [queue])[0]


def queue_depths(client, keys: Keys, group: str, queues: list) -> list:
    """:func:`queue_depth` of each of ``queues``, in one round trip (one per master on a
    cluster)."""
    return [ready for ready, _ in queue_counts(client, keys, group, queues)]


def queue_counts(client, keys: Keys, group: str, queues: list) -> list:
    """``(ready, unacked)`` of each of ``queues`` over every priority bucket, in one round trip
    (one per master on a cluster): what no consumer received yet, and what ``group``'s
    consumers hold (delivered, not acked). Flower's queue lengths."""
    commands = [depth_commands(keys, group, queue) for queue in queues]
    with client.pipeline(transaction=False) as pipe:
        for command in (command for each in commands for command in each):
            pipe.execute_command(*command)
        replies = pipe.execute(raise_on_error=False)
    counts, start = [], 0
    for each in commands:
        counts.append(counts_of(replies[start:start + len(each)]))
        start += len(each)
    return counts


def depth_commands(keys: Keys, group: str, queue: str) -> list:
    """``XLEN`` and ``XPENDING`` (summary) of every stream of ``queue``: see :func:`counts_of`."""
    return [command for key in keys.streams(queue)
            for command in (('XLEN', key), ('XPENDING', key, group))]


def depth_of(replies) -> int:
    """The messages no consumer received yet, from the replies to :func:`depth_commands`."""
    return counts_of(replies)[0]


def counts_of(replies) -> tuple:
    """``(ready, unacked)`` from the replies to :func:`depth_commands` (a stream without the
    group, or without the key, has none pending)."""
    ready = unacked = 0
    for length, pending in zip(replies[::2], replies[1::2]):
        if isinstance(length, Exception):
            raise length
        if isinstance(pending, dict):   # redis-py's parsed summary
            pending = pending['pending']
        elif isinstance(pending, (list, tuple)):   # the raw reply: count, smallest, greatest...
            pending = pending[0]
        else:
            pending = 0
        ready += max(length - pending, 0)
        unacked += pending
    return ready, unacked
