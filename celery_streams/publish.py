"""``Producer.batch()`` support: publishes buffered in one pipeline.

kombu 5.7's ``with producer.batch(): producer.publish(...)`` routes each message
as usual and hands the resulting Redis commands to this batch, which sends
them in one round trip per ``max_size`` commands (and on exit). Until a flush
returns, a buffered message is not published.
"""
from __future__ import annotations

from kombu.exceptions import BatchPublishError

from . import replication


class PublishBatch:
    """Buffer the writes of several publishes in one non-transactional pipeline."""

    def __init__(self, channel, max_size):
        self.channel = channel
        self.max_size = max_size
        self.pipeline = channel.pool_client.pipeline(transaction=False)
        self._buffered = 0
        self._failed = None
        self._closed = False
        self._on_results = []   # (index of the write's first reply, callback)

    def publish(self, message, **kwargs):
        self._check_usable()
        result = self.channel.basic_publish(message, _publish_batch=self, **kwargs)
        if self._buffered >= self.max_size:
            self.flush()
        return result

    def add(self, write, on_result=None):
        """Buffer one write: ``write(pipeline)`` queues its commands.

        ``on_result(reply)`` is called with the reply of the write's first
        command when the batch is flushed.
        """
        if on_result is not None:
            self._on_results.append((len(self.pipeline.command_stack), on_result))
        write(self.pipeline)
        self._buffered += 1

    def flush(self):
        self._check_usable()
        if not self._buffered:
            return
        wait = replication.wait_command(self.channel.options)
        if wait:   # confirmed by replicas: one WAIT behind the whole batch
            self.pipeline.execute_command(*wait)
        try:
            results = self.pipeline.execute(raise_on_error=False)
        except Exception as exc:
            self._failed = exc
            raise BatchPublishError('publish batch failed; delivery is uncertain') from exc
        finally:
            self._buffered = 0
            self.pipeline.reset()
            callbacks, self._on_results = self._on_results, []
        confirmed = results.pop() if wait else None
        for index, on_result in callbacks:
            if not isinstance(results[index], Exception):
                on_result(results[index])
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            self._failed = errors[0]
            raise BatchPublishError('%d of %d writes of a publish batch failed: %s'
                                    % (len(errors), len(results), errors[0])) from errors[0]
        if wait:
            try:
                replication.confirm(confirmed, self.channel.options, self.channel.pool)
            except Exception as exc:
                self._failed = exc
                raise

    def discard(self):
        self._buffered = 0
        self._on_results = []
        self.pipeline.reset()

    def close(self):
        if not self._closed:
            self._closed = True
            self.pipeline.reset()

    def _check_usable(self):
        if self._closed:
            raise RuntimeError('publish batch is closed')
        if self._failed is not None:
            raise BatchPublishError('a publish batch cannot be reused after a failure') from self._failed
