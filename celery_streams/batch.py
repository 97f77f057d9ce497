"""``Producer.batch()`` support: publishes buffered and sent in one write.

kombu 5.7's ``with producer.batch(): producer.publish(...)`` routes each message
as usual and hands the resulting Redis commands to this batch, which sends
them in one round trip per ``max_size`` publishes (and on exit), packed by hand
(:mod:`celery_streams.wire`) on the channel's publish connection. Until a flush
returns, a buffered message is not published.
"""
from __future__ import annotations

from kombu.exceptions import BatchPublishError


class PublishBatch:
    """Buffer the commands of several publishes; send them in one write."""

    def __init__(self, channel, max_size):
        self.channel = channel
        self.max_size = max_size
        self._commands: list = []
        self._buffered = 0
        self._failed = None
        self._closed = False
        self._on_replies = []   # (index of the publish's first command, its count, callback)

    def publish(self, message, **kwargs):
        self._check_usable()
        result = self.channel.basic_publish(message, _publish_batch=self, **kwargs)
        if self._buffered >= self.max_size:
            self.flush()
        return result

    def add(self, commands, on_replies=None):
        """Buffer the commands of one publish.

        ``on_replies(replies)`` is called with the replies of its commands
        once the batch was flushed and they ran.
        """
        if on_replies is not None:
            self._on_replies.append((len(self._commands), len(commands), on_replies))
        self._commands.extend(commands)
        self._buffered += 1

    def flush(self):
        self._check_usable()
        if not self._buffered:
            return
        publisher = self.channel.publisher
        commands, callbacks = self._commands, self._on_replies

        def dispatch(replies):
            for start, count, on_replies in callbacks:
                on_replies(replies[start:start + count])

        self.discard()
        try:
            # WAIT behind the whole batch when confirmed by replicas.
            publisher.run(commands, on_replies=dispatch if callbacks else None)
        except Exception as exc:
            self._failed = exc
            raise BatchPublishError('%s of a publish batch of %d commands failed, delivery is '
                                    'uncertain: %s' % (type(exc).__name__, len(commands), exc)) from exc

    def discard(self):
        self._buffered = 0
        self._commands = []
        self._on_replies = []

    def close(self):
        if not self._closed:
            self._closed = True
            self.discard()

    def _check_usable(self):
        if self._closed:
            raise RuntimeError('publish batch is closed')
        if self._failed is not None:
            raise BatchPublishError('a publish batch cannot be reused after a failure') from self._failed
