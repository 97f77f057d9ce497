"""The consume loop: one outstanding ``XREADGROUP ... BLOCK`` per consuming channel.

Two drivers share this code:

* the worker's event hub (every pool but gevent/eventlet: prefork, solo,
  threads): :meth:`Poller.attach` adds an ``on_tick`` callback that *sends* a
  read for every channel that may consume and registers its socket; the hub
  calls :meth:`Poller.on_readable` when the reply is there, so the hub never
  blocks on Redis;
* ``Connection.drain_events`` (gevent, eventlet, plain kombu):
  :meth:`Poller.drain_events` sends the same reads and waits on the sockets
  with ``poll()``.

Reads always block with a bound (``polling_interval``), never ``BLOCK 0``: on
Redis 6.2 a reader blocked on a deleted stream only learns about it from the
next read (see docs/design).

Delayed delivery: Redis ends a ``BLOCK`` on its own timer, up to about 100 ms
late, so the loop also wakes itself when the next scheduled message of a
channel is due (a hub timer; the ``poll()`` timeout in ``drain_events``) and
has the channel move it (:meth:`ConsumingChannel.promote_due`, on the publish
connection): its ``XADD`` wakes the outstanding blocking read at once.
"""
from __future__ import annotations

import logging
import select
import socket
import threading
from time import monotonic, sleep
from typing import Optional, Protocol

from .liveness import Renewer

logger = logging.getLogger(__name__)

#: Seconds past the server-side BLOCK after which a read without reply means a
#: dead (half-open) connection.
STALE_READ_MARGIN = 10.0
#: Seconds the worker's hub sleeps at most (a timer that does nothing): its tick looks for
#: stale reads, and an idle hub would otherwise sleep up to 10 s between ticks.
TICK_AT_LEAST_EVERY = 1.0
#: Seconds: the shortest wait for a scheduled message to come due (a clock estimate a
#: little ahead of the server's must not make the loop spin).
MIN_DUE_WAIT = 0.002


class ConsumingChannel(Protocol):
    """What the poller asks of a channel (:class:`celery_streams.transport.Channel`)."""

    def reading_on(self, fd: int) -> bool:
        """A read was sent on socket ``fd`` and its reply not parsed yet."""

    def loop_turn(self, thread_ident: Optional[int]) -> None:
        """Acks made on that thread wait for the next :meth:`flush_acks` (None: sent at once)."""

    def flush_acks(self, carry: bool = False) -> bool:
        """Send the queued acks; ``carry``: unless the next read goes out soon and will carry
        them (then True: they wait for it)."""
    def maybe_reclaim(self) -> None: ...
    def deliver_buffered(self, limit: Optional[int] = None) -> bool: ...
    def has_buffered(self) -> bool: ...

    def start_read(self) -> list:
        """Send a read on each lane that has none out, unless nothing may be read (a lane: one
        connection; a channel on one server has one, on a Redis Cluster one per slot it reads).
        Returns the file descriptors of the sockets with a read out."""

    def read_held_back(self) -> Optional[float]:
        """Seconds until a read the last :meth:`start_read` held back goes out (None: none).

        A busy channel waits for more of its prefetch window to come free, so
        that one read brings several messages (:meth:`celery_streams.qos.QoS.refill_wait`).
        """

    def read_socket(self, fd: int) -> object:
        """The socket of the read outstanding on ``fd`` (None when there is none)."""

    def finish_read(self, fd: int) -> bool: ...
    def promote_due(self) -> None:
        """Move the scheduled messages that came due into their streams (delayed delivery)."""

    def next_due_in(self) -> Optional[float]:
        """Seconds until the next scheduled message known to be due, or None."""

    def check_stale_read(self, margin: float) -> None: ...
    def drop_reader_connection(self, fd: int) -> None: ...
    def renewal_tick(self) -> bool:
        """Called from the renewal thread about every second: renew what is due.

        False once a closed channel holds nothing more.
        """


class Poller:
    """The channels of one transport that consume, and their outstanding reads."""

    def __init__(self, renew_every=None):
        self.channels: list[ConsumingChannel] = []
        self.held: list[ConsumingChannel] = []
        self.hub = None
        self._hub_fds: dict[int, ConsumingChannel] = {}   # fd -> channel, registered with the hub
        # fd -> the socket registered: a reconnect may reuse the number of a closed one,
        # which epoll forgot when it was closed.
        self._hub_socks: dict = {}
        self._due_timers: dict = {}   # channel -> (monotonic time, hub timer entry): next due
        self._refill_timers: dict = {}   # channel -> hub timer entry: a held-back read
        self._in_tick = False
        self._tick_timer = None
        self._renewer = Renewer(self, min(renew_every, Renewer.EVERY)) if renew_every else None

    def add(self, channel):
        if channel not in self.channels:
            self.channels.append(channel)
        if self._renewer is not None:
            self._renewer.ensure_started()

    def hold(self, channel):
        """A channel closed after a lost connection still holds running tasks: keep it alive.

        The renewal thread renews its liveness until it holds nothing (its
        tasks were acked), so no other consumer takes them over meanwhile.
        """
        self.discard(channel)
        if self._renewer is not None:
            self.held.append(channel)
            self._renewer.ensure_started()

    def renewed_channels(self) -> list:
        """The channels the renewal thread serves: consuming ones, then held ones."""
        return list(self.channels) + list(self.held)

    def close(self):
        if self._renewer is not None:
            self._renewer.stop_when_idle()

    def discard(self, channel):
        if channel in self.channels:
            self.channels.remove(channel)
        self._disarm(channel)
        for fd, owner in list(self._hub_fds.items()):
            if owner is channel:
                self._forget_fd(fd)

    # -- the event hub --------------------------------------------------------

    def attach(self, hub):
        self.hub = hub
        hub.on_tick.add(self.on_tick)
        hub.on_close.add(lambda hub: self.detach())
        self._tick_timer = hub.call_repeatedly(TICK_AT_LEAST_EVERY, _wake)

    def detach(self):
        if self.hub is not None:
            if self._tick_timer is not None:
                self._tick_timer.cancel()
                self._tick_timer = None
            self.hub.on_tick.discard(self.on_tick)
            for fd in list(self._hub_fds):
                self._forget_fd(fd)
            for channel in set(self._due_timers) | set(self._refill_timers):
                self._disarm(channel)
            self.hub = None

    def on_tick(self):
        self._in_tick = True
        try:
            for channel in list(self.channels):
                self._start_and_flush(channel)
        finally:
            self._in_tick = False

    def _timer_armed(self):
        """A timer was armed: from ``on_tick``, wake the hub so that it sleeps no longer than that.

        kombu's hub works out how long to sleep (its next timer) *before* it
        calls ``on_tick``, so without this a timer armed there would wait for
        the next event or a timer already set: up to a second, so scheduled
        messages would come due that much late.
        """
        waker = getattr(self.hub, '_waker', None) if self._in_tick else None
        if waker is not None:
            waker.wake()

    def on_readable(self, fd):
        channel = self._hub_fds.get(fd)
        if channel is None:
            self._forget_fd(fd)
            return
        if not channel.reading_on(fd):
            # No reply is expected: the server closed the idle connection.
            self._forget_fd(fd)
            channel.drop_reader_connection(fd)
            return
        try:
            channel.finish_read(fd)
        except Exception:
            self._forget_fd(fd)
            raise
        # The hub's pools do not block: hand over the whole batch, then read on.
        try:
            channel.deliver_buffered()
        finally:
            self._start_and_flush(channel)

    def _start_and_flush(self, channel):
        """Read on, then send the acks of this turn: those the next read will carry (it went
        out now, or goes out within ``REFILL_WAIT``) wait for it.

        Acks waiting for a held-back read need its timer on time: armed from ``on_tick``,
        the hub would sleep past it (see :meth:`_timer_armed`) and, on an idle worker, the
        acks with it, so the hub is woken then.
        """
        armed = channel in self._refill_timers
        try:
            self._start(channel)
        except BaseException:
            channel.flush_acks()
            raise
        if channel.flush_acks(carry=True) and not armed and channel in self._refill_timers:
            self._timer_armed()   # once, when the timer is new: from on_tick, a wake-up

    def _start(self, channel):
        channel.loop_turn(threading.get_ident())   # acks wait for the next tick
        try:
            channel.maybe_reclaim()
            channel.deliver_buffered()
            fds = channel.start_read()
        except Exception:
            self._forget_channel_fds(channel)
            raise
        for fd, owner in list(self._hub_fds.items()):
            if owner is channel and fd not in fds:
                self._forget_fd(fd)
        for fd in fds:
            sock = channel.read_socket(fd)
            if self._hub_fds.get(fd) is not channel or self._hub_socks.get(fd) is not sock:
                self._forget_fd(fd)
                self._hub_fds[fd] = channel
                self._hub_socks[fd] = sock
                self.hub.add_reader(fd, self.on_readable, fd)
        if channel.read_held_back() is not None:
            self._arm_refill(channel)
        self._arm(channel)
        channel.check_stale_read(STALE_READ_MARGIN)

    def _arm(self, channel):
        """Keep one hub timer per channel at the due time of its next scheduled message."""
        due_in = channel.next_due_in()
        armed = self._due_timers.get(channel)
        if due_in is None:
            self._disarm(channel)
            return
        when = monotonic() + max(due_in, MIN_DUE_WAIT)
        if armed is not None:
            if abs(armed[0] - when) < MIN_DUE_WAIT:
                return
            armed[1].cancel()
        self._due_timers[channel] = (when, self.hub.call_later(when - monotonic(), self._on_due, channel))
        self._timer_armed()

    def _disarm(self, channel):
        armed = self._due_timers.pop(channel, None)
        if armed is not None:
            armed[1].cancel()
        refill = self._refill_timers.pop(channel, None)
        if refill is not None:
            refill.cancel()

    def _arm_refill(self, channel):
        """A read held back for a fuller window goes out when its wait ends, events or not."""
        wait = channel.read_held_back()
        if wait is not None and channel not in self._refill_timers:
            # No wake-up (unlike a due timer): a busy channel gets its acks' events
            # soon, and waking a loaded hub for each held-back read cost a 4-worker
            # run about a tenth of its throughput.
            self._refill_timers[channel] = self.hub.call_later(wait, self._on_refill, channel)

    def _on_refill(self, channel):
        self._refill_timers.pop(channel, None)
        if channel in self.channels and self.hub is not None:
            self._start_and_flush(channel)

    def _on_due(self, channel):
        """The hub timer: move the channel's due messages; the XADD wakes its blocked read."""
        self._due_timers.pop(channel, None)
        if channel not in self.channels or self.hub is None:
            return
        try:
            channel.promote_due()
        except Exception as exc:   # the consume loop reports a lost connection on its next read
            logger.debug('celery_streams: moving due scheduled messages failed: %s', exc)
            return
        self._arm(channel)

    def _forget_channel_fds(self, channel):
        for fd, owner in list(self._hub_fds.items()):
            if owner is channel:
                self._forget_fd(fd)

    def _forget_fd(self, fd):
        self._hub_fds.pop(fd, None)
        self._hub_socks.pop(fd, None)
        if self.hub is not None:
            try:
                self.hub.remove_reader(fd)
            except (KeyError, ValueError, OSError):
                pass

    # -- drain_events ---------------------------------------------------------

    def drain_events(self, timeout=None):
        """Deliver the next message; raise ``socket.timeout`` when none came in time.

        Acks made by callbacks are sent before this returns, or, while read
        messages wait in the buffer, with a later call (or at close).
        """
        thread = threading.get_ident()
        for channel in list(self.channels):
            channel.loop_turn(thread)     # acks wait until this call returns
        try:
            self._drain_events(timeout)
        finally:
            for channel in list(self.channels):
                channel.loop_turn(None)
                if not channel.has_buffered():
                    # Acks made by callbacks go out now, or with the next call's
                    # while buffered messages make more calls certain (or at close).
                    channel.flush_acks()

    def _drain_events(self, timeout):
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            # One message per call (kombu's contract: Mailbox._collect counts
            # replies by calls), from what a read buffered.
            for channel in list(self.channels):
                channel.maybe_reclaim()
                if channel.deliver_buffered(limit=1):
                    return
            reading = {}
            for channel in list(self.channels):
                for fd in channel.start_read():
                    reading[fd] = channel
            remaining = None if deadline is None else max(deadline - monotonic(), 0)
            if not reading:
                if remaining == 0:
                    raise socket.timeout()
                # Nothing may be read now (no consumer, QoS full, or a read held
                # back for a fuller window): wait a bit.
                pause = min([0.05] + [wait for wait in (c.read_held_back() for c in self.channels)
                                      if wait is not None])
                sleep(pause if remaining is None else min(pause, remaining))
                continue
            channels = list(dict.fromkeys(reading.values()))
            wait, due_in = remaining, _nearest(channel.next_due_in() for channel in channels)
            if due_in is not None:   # wake when the next scheduled message is due
                due_in = max(due_in, MIN_DUE_WAIT)
                wait = due_in if remaining is None else min(remaining, due_in)
            ready = _wait_readable(reading, wait)
            if not ready and due_in is not None:
                for channel in channels:   # the XADD wakes its blocked read
                    channel.promote_due()
            for fd in ready:
                reading[fd].finish_read(fd)
            if any(channel.deliver_buffered(limit=1) for channel in channels):
                return
            for channel in channels:
                channel.check_stale_read(STALE_READ_MARGIN)
            if deadline is not None and monotonic() >= deadline:
                raise socket.timeout()


def _wake() -> None:
    """A hub timer's work: none; firing it makes the hub run its tick (:meth:`Poller.on_tick`)."""


def _nearest(values) -> Optional[float]:
    found = [value for value in values if value is not None]
    return min(found) if found else None


def _wait_readable(fds, timeout):
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
    try:
        events = poller.poll(None if timeout is None else timeout * 1000)
    except InterruptedError:  # pragma: no cover
        return []
    return [fd for fd, _ in events]
