"""Delivery tags and the QoS of a channel: acks, rejects and restores go to Redis.

A delivery tag names the entry it was made for, ``"<entry id>/<consumer>/<queue>"``,
so an ack works from any channel and after a reconnect, and every delivered copy
(a broadcast reaches several queues) has its own tag.
"""
from __future__ import annotations

from kombu.transport import virtual


def make_tag(entry_id: str, consumer: str, queue: str) -> str:
    return '%s/%s/%s' % (entry_id, consumer, queue)


def parse_tag(tag: str) -> tuple[str, str, str]:
    """``(entry id, consumer, queue)`` of a delivery tag."""
    entry_id, consumer, queue = tag.split('/', 2)
    return entry_id, consumer, queue


class QoS(virtual.QoS):
    """kombu's prefetch accounting, with acks and restores sent to Redis."""

    def ack(self, delivery_tag):
        self.channel.ack_later(delivery_tag)
        super().ack(delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        if requeue:
            failed = self.channel.restore_tags([delivery_tag])
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
