"""Publish confirmation by replicas: ``WAIT`` behind the write, on the same connection.

Redis replicates asynchronously: a publish the master acknowledged may not
have reached any replica when the master fails, and a failover then loses it
(docs/sentinel.md). With ``publish_wait_replicas`` N, every publish sends
``WAIT N <publish_wait_timeout in ms>`` right behind its write, pipelined on the
same connection (one round trip), and returns only once N replicas
acknowledged everything that connection wrote. When fewer did
(:func:`celery_streams.sentinel.shortfall` says why):

* the master is being replaced (a Sentinel failover): :class:`~celery_streams.errors.MasterMoved`, a
  connection error, so kombu reconnects and Celery's retry policy publishes
  again, to the new master;
* otherwise :class:`~celery_streams.errors.NotReplicated`, not retried.

Not set, ``publish_wait_replicas`` is 1 with a ``sentinel-streams://`` URL and
``publish_confirm='now'`` (:func:`replicas_to_wait_for`), with one difference:
a master the Sentinels name that has no replica online (a replica down, or a
new master whose old one is not demoted yet) takes publishes without them.
No failover can keep them then, and none can lose them to a replica that
lacks them. Its publishes then send ``ROLE`` instead of ``WAIT`` (no wait),
until a replica is online again.
"""
from __future__ import annotations

import logging

from .errors import MasterMoved, NotReplicated
from .sentinel import ALONE, MOVED

logger = logging.getLogger(__name__)

#: Sent behind a publish while the master has no replica online (default with Sentinel).
ROLE = ('ROLE',)


def replicas_to_wait_for(options, address) -> int:
    """``publish_wait_replicas`` as given; not given: 1 with Sentinel and
    ``publish_confirm='now'`` (a publish that returned survives a failover), else 0 (one
    server, a cluster, or publishes confirmed later: nothing to wait for, nothing paid)."""
    if options.publish_wait_replicas is not None:
        return options.publish_wait_replicas
    return 1 if address.sentinels and options.publish_confirm == 'now' else 0


class Wait:
    """The command sent behind each publish, and the check of its reply.

    ``topology`` (a :class:`~celery_streams.topology.ServerTopology`) says where
    the master is (``master``) and why replicas fell short (``shortfall``).
    ``lenient`` (the Sentinel default): a master alone takes publishes
    unconfirmed, and sends ``ROLE`` until a replica is online.
    """

    def __init__(self, replicas: int, timeout: float, topology=None, lenient: bool = False):
        self.replicas = replicas
        self.timeout = timeout
        self.wait = ('WAIT', replicas, max(1, round(timeout * 1000)))
        self.topology = topology
        self.lenient = lenient
        #: The master has no replica online: publishes send ``ROLE``, not ``WAIT``.
        self.alone = False
        #: ``(host, port)`` of the master when the last publish was sent (Sentinel), or None.
        self.written_to = None

    @property
    def command(self) -> tuple:
        return ROLE if self.alone else self.wait

    def begin(self) -> tuple:
        """The command to send behind a publish about to be sent; notes where the master is
        (a failover during the publish must not pass for this master's shortfall)."""
        self.written_to = getattr(self.topology, 'master', None)
        return self.command

    def confirm(self, reply) -> None:
        """Return if ``reply`` (of :attr:`command`) confirms the publish, else raise
        :class:`MasterMoved` or :class:`~celery_streams.errors.NotReplicated`."""
        if isinstance(reply, Exception):
            raise reply
        if isinstance(reply, list):   # ROLE: master, offset, replicas online
            if len(reply) > 2 and reply[2]:
                self.alone = False
                logger.warning('celery_streams: a replica is online again: publishes wait for it')
            return
        count = int(reply)
        if count >= self.replicas:
            return
        shortfall = getattr(self.topology, 'shortfall', None)
        verdict = shortfall(self.written_to) if shortfall is not None else None
        if verdict == MOVED:
            raise MasterMoved(
                'publish not confirmed: the master is being replaced (Sentinel failover), %d of %d '
                'replica(s) acknowledged it within %gs; publishing again to the new master'
                % (count, self.replicas, self.timeout))
        if verdict == ALONE and self.lenient:
            self.alone = True
            logger.warning('celery_streams: the master has no replica online: publishes are not '
                           'confirmed by a replica until one is')
            return
        raise NotReplicated(
            'publish not confirmed: %d of %d replica(s) acknowledged it within %gs '
            '(publish_wait_replicas); the master has it, a failover now may lose it, and it may '
            'still run' % (count, self.replicas, self.timeout))


def for_publisher(options, topology) -> Wait | None:
    """The :class:`Wait` of a channel's publisher, or None when publishes wait for no replica."""
    replicas = replicas_to_wait_for(options, topology.address)
    if not replicas:
        return None
    return Wait(replicas, options.publish_wait_timeout, topology,
                lenient=options.publish_wait_replicas is None)
