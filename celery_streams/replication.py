"""Publish confirmation by replicas: ``WAIT`` behind the write, on the same connection.

Redis replicates asynchronously: a publish the master acknowledged may not
have reached any replica when the master fails, and a failover then loses it
(docs/sentinel.md). With the transport option ``publish_wait_replicas`` set to
N, every publish sends ``WAIT N <publish_wait_timeout in ms>`` right behind its
write, pipelined on the same connection (one round trip), and returns only
once N replicas acknowledged everything that connection wrote. Fewer within the
timeout: :class:`~celery_streams.errors.NotReplicated` is raised to the
publisher, and the pool asks the Sentinels where the master is (the usual
reason is that this one was just demoted or lost its replicas).
"""
from __future__ import annotations

from .errors import NotReplicated


def wait_command(options) -> tuple | None:
    """``('WAIT', replicas, ms)`` to send behind a publish, or None when confirmation is off."""
    if not options.publish_wait_replicas:
        return None
    return ('WAIT', options.publish_wait_replicas, max(1, round(options.publish_wait_timeout * 1000)))


def confirm(reply, options, follow_master=None) -> None:
    """Raise unless ``reply`` (of ``WAIT``) counts enough replicas (then ``follow_master()``
    asks where the master is first)."""
    if isinstance(reply, Exception):
        raise reply
    if int(reply) < options.publish_wait_replicas:
        if follow_master is not None:
            follow_master()
        raise NotReplicated(
            'publish not confirmed: %d of %d replica(s) acknowledged it within %gs '
            '(publish_wait_replicas); the master has it, a failover now may lose it, and it may '
            'still run' % (int(reply), options.publish_wait_replicas, options.publish_wait_timeout))
