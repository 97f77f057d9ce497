"""``celery streams exporter``: serve Prometheus metrics of the queues over HTTP.

A ``ThreadingHTTPServer`` of the standard library answers ``GET /metrics``
with the text of :class:`celery_streams.exporter.Exporter`, collected at most
every ``--interval`` seconds. A failed collection is one line on stderr (once,
until it changes; another when Redis answers again) and
``celery_streams_up 0`` / ``celery_streams_last_scrape_error 1`` in the
metrics; the server keeps running. Ctrl-C or SIGTERM stops it cleanly
(exit status 0).
"""
from __future__ import annotations

import signal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import click
from celery.bin.base import CeleryCommand, CeleryOption

from ..errors import one_line
from ..exporter import CONTENT_TYPE, DEFAULT_INTERVAL, Exporter
from .base import Target, obj_of, prefix_option, streams

DEFAULT_PORT = 9808
INDEX = b'celery_streams exporter: metrics at /metrics\n'


class _Stop(Exception):
    """SIGTERM: leave serve_forever like Ctrl-C does."""


class MetricsServer(ThreadingHTTPServer):
    daemon_threads = True   # a scrape in progress does not hold the shutdown

    def __init__(self, address, exporter: Exporter):
        self.exporter = exporter
        super().__init__(address, MetricsHandler)


class MetricsHandler(BaseHTTPRequestHandler):
    server: MetricsServer

    def do_GET(self):
        self._answer(send_body=True)

    def do_HEAD(self):
        self._answer(send_body=False)

    def _answer(self, send_body: bool):
        path = self.path.split('?', 1)[0]
        if path == '/metrics':
            status, kind, body = 200, CONTENT_TYPE, self.server.exporter.metrics().encode()
        elif path == '/':
            status, kind, body = 200, 'text/plain; charset=utf-8', INDEX
        else:
            status, kind, body = 404, 'text/plain; charset=utf-8', b'not found: see /metrics\n'
        self.send_response(status)
        self.send_header('Content-Type', kind)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format, *args):   # no line per scrape
        pass


@streams.command(cls=CeleryCommand)
@click.option('--port', cls=CeleryOption, type=click.IntRange(0, 65535), default=DEFAULT_PORT,
              show_default=True, help_group='Exporter Options',
              help='TCP port to serve /metrics on (0: any free port, printed at start).')
@click.option('--address', cls=CeleryOption, default='127.0.0.1', show_default=True,
              help_group='Exporter Options',
              help='Address to listen on (0.0.0.0: every interface).')
@click.option('--interval', cls=CeleryOption, type=click.FloatRange(min=0), default=DEFAULT_INTERVAL,
              show_default=True, help_group='Exporter Options',
              help='Collect at most every this many seconds; scrapes in between get the '
                   'last collection.')
@prefix_option
@click.pass_context
def exporter(ctx, port, address, interval, prefix, **kwargs):
    """Serve Prometheus metrics of the queues on http://ADDRESS:PORT/metrics.

    Waiting, pending, lag, consumers, oldest pending age and dead letters of
    every queue under the prefix (names: docs/metrics.md). A Redis that cannot
    be reached gives celery_streams_up 0, not an exit.
    """
    obj = obj_of(ctx)
    target = Target(ctx, prefix)

    def describe(exc: BaseException) -> str:
        """The line the other commands would say of ``exc`` (see ``one_line_errors``)."""
        try:
            with target.errors():
                raise exc
        except click.ClickException as said:
            return said.format_message()
        except BaseException:
            return one_line(exc)

    def on_change(error):
        if error is None:
            obj.echo('Redis at %s answers again.' % target.url)
        else:
            obj.error('Collection failed: %s' % error)

    metrics = Exporter(target.client, global_keyprefix=target.prefix, consumer_group=target.group,
                       interval=interval, describe=describe, on_change=on_change)
    try:
        server = MetricsServer((address, port), metrics)
    except OSError as exc:
        raise click.ClickException('cannot listen on %s:%s: %s'
                                   % (address, port, one_line(exc))) from None
    host, bound = server.server_address[:2]
    obj.echo('Serving metrics of %s, group %r on http://%s:%s/metrics (collected at most every %ss)'
             % (target.describe(), target.group, host, bound, interval))

    def stop(signum, frame):
        raise _Stop()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()
    obj.echo('Exporter stopped.')
