"""A small TCP proxy for network faults in tests (what Toxiproxy does, in one thread a link).

:class:`Proxy` listens on a free loopback port and forwards each connection to
a Redis port. Its controls:

* :meth:`Proxy.blackhole` -- a silent network: every connection stays open, but
  nothing is forwarded any more, either way, and what arrives is dropped: no
  reply, no RST, no FIN (a closing side's FIN vanishes too). New connections are
  accepted and are dead alike (the client's connect succeeds, as it does at
  a load balancer; its first command gets no reply);
* :meth:`Proxy.heal` -- forward again: new connections work, but a connection that
  was blackholed stays dead, as a real one whose packets were lost would;
* :meth:`Proxy.cut` -- close every connection at once (an RST to both ends);
* :meth:`Proxy.delay` -- hold each chunk ``seconds`` before forwarding it, each
  direction reading its next chunk only then (a slow link, not only latency); 0: off.

:attr:`Proxy.accepted` counts the connections accepted; :meth:`Proxy.live` and
:meth:`Proxy.dead` count the open ones that forward and the blackholed ones. The
:func:`proxy` fixture gives ``make(port)`` and closes every proxy (and socket) it
made at teardown.

A user-space proxy answers TCP keepalive probes itself (its kernel holds the
sockets): keepalive cannot see this blackhole, only timeouts above TCP can.
"""
from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from tests.servers import free_port

CHUNK = 65536


class Link:
    """One proxied connection: the client's socket, the upstream one, and whether it is dead."""

    def __init__(self, client: socket.socket, upstream: socket.socket | None):
        self.client = client
        self.upstream = upstream
        self.dead = upstream is None    # blackholed: nothing is forwarded, ever again
        self.closed = False

    def close(self, reset=False) -> None:
        self.closed = True
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            try:
                if reset:   # SO_LINGER 0: close() sends an RST
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
                sock.shutdown(socket.SHUT_RDWR)   # wakes the pump blocked in recv()
            except OSError:
                pass
            sock.close()


class Proxy:
    """Forwards ``127.0.0.1:<port>`` to ``target_host:target_port``; see the module."""

    def __init__(self, target_port: int, target_host: str = '127.0.0.1'):
        self.target = (target_host, target_port)
        self.port = free_port()
        self.listener = socket.create_server(('127.0.0.1', self.port))
        self.links: list[Link] = []
        self.accepted = 0
        self.blackholed = False
        self.seconds = 0.0
        self._lock = threading.Lock()
        self._closing = False
        self._threads = [threading.Thread(target=self._accept, daemon=True, name='proxy-accept')]
        self._threads[0].start()

    def url(self, db=0) -> str:
        return 'redis-streams://127.0.0.1:%d/%d' % (self.port, db)

    # -- the controls ---------------------------------------------------------

    def blackhole(self) -> None:
        with self._lock:
            self.blackholed = True
            for link in self.links:
                link.dead = True

    def heal(self) -> None:
        with self._lock:
            self.blackholed = False
            self.seconds = 0.0

    def cut(self) -> None:
        with self._lock:
            links, self.links = self.links, []
        for link in links:
            link.close(reset=True)

    def delay(self, seconds: float) -> None:
        self.seconds = seconds

    def live(self) -> int:
        with self._lock:
            return sum(1 for link in self.links if not link.dead and not link.closed)

    def dead(self) -> int:
        with self._lock:
            return sum(1 for link in self.links if link.dead and not link.closed)

    def close(self) -> None:
        self._closing = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.cut()
        for thread in self._threads:
            thread.join(5)

    # -- the threads ----------------------------------------------------------

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = None
            if not self.blackholed:
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                    upstream.settimeout(None)
                except OSError:
                    client.close()   # nothing listens there: the client sees the close
                    continue
            link = Link(client, upstream)
            with self._lock:
                self.accepted += 1
                self.links.append(link)
            self._pump(link, link.client, link.upstream)
            if upstream is not None:
                self._pump(link, link.upstream, link.client)

    def _pump(self, link: Link, source, sink) -> None:
        thread = threading.Thread(target=self._forward, args=(link, source, sink), daemon=True,
                                  name='proxy-pump')
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _forward(self, link: Link, source, sink) -> None:
        """Copy ``source`` to ``sink`` until either closes; a dead link drops what comes."""
        while not link.closed:
            try:
                data = source.recv(CHUNK)
            except OSError:
                data = b''
            if link.dead:
                if not data:   # the FIN (or the teardown) vanishes; the other end never hears
                    return
                continue
            if not data:
                self._end(link)
                return
            if self.seconds:
                time.sleep(self.seconds)
            try:
                if not link.dead:
                    sink.sendall(data)
            except OSError:
                self._end(link)
                return

    def _end(self, link: Link) -> None:
        """One end of a live link closed: close the other (as the network would pass it on)."""
        with self._lock:
            if link in self.links:
                self.links.remove(link)
        link.close()


@pytest.fixture
def proxy():
    """``make(target_port)``: a :class:`Proxy` to that port; all are closed at teardown."""
    made: list[Proxy] = []

    def make(target_port: int) -> Proxy:
        made.append(Proxy(target_port))
        return made[-1]

    yield make
    for each in made:
        each.close()
