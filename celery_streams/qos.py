"""Delivery tags and the QoS of a channel: acks, rejects and restores go to Redis.

A delivery tag names the entry it was made for,
``"<entry id>/<consumer>/<priority bucket>/<queue>"``, so an ack works from any
channel and after a reconnect, and every delivered copy (a broadcast reaches
several queues) has its own tag.
"""
from __future__ import annotations

from typing import NamedTuple

from kombu.transport import virtual


class Tag(NamedTuple):
    entry_id: str
    consumer: str
    bucket: int
    queue: str


def make_tag(entry_id: str, consumer: str, queue: str, bucket: int = 0) -> str:
    return '%s/%s/%d/%s' % (entry_id, consumer, bucket, queue)


def parse_tag(tag: str) -> Tag:
    entry_id, consumer, bucket, queue = tag.split('/', 3)
    return Tag(entry_id, consumer, int(bucket), queue)


class QoS(virtual.QoS):
    """kombu's prefetch accounting, with acks and restores sent to Redis."""

    def ack(self, delivery_tag):
        self.channel.ack_later(delivery_tag)
        super().ack(delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        if requeue:
            failed = self.channel.restore_tags([delivery_tag], attempted=True)
            if failed:
                raise failed[0][1]
        else:
            self.channel.ack_tags([delivery_tag])
        self._quick_ack(delivery_tag)

    def restore_unacked(self):
        """Put every unacked message back, in one round trip; return the failures."""
        self._flush()
        delivered = self._delivered
        messages = dict(delivered)
        delivered.clear()
        failed = self.channel.restore_tags(list(messages))
        return [(error, messages[tag]) for tag, error in failed if tag not in self._dirty]
