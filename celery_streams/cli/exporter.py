"""``celery streams exporter``: serve Prometheus metrics of the queues over HTTP.

The registry of :func:`celery_streams.exporter.registry` (the queues' collector,
collected at most every ``--interval`` seconds, and prometheus_client's process
and platform collectors) is served by prometheus_client's WSGI app
(``make_wsgi_app``: the text format 0.0.4, or OpenMetrics when the Accept
header asks for it, gzip when accepted) on ``/metrics``, through a threading
``wsgiref`` server of the standard library; ``/`` says where the metrics are,
other paths answer 404. A failed collection is one line on stderr (once, until
it changes; another when Redis answers again) and ``celery_streams_up 0`` /
``celery_streams_last_scrape_error 1`` in the metrics; the server keeps
running. Ctrl-C or SIGTERM stops it cleanly (exit status 0).
"""
from __future__ import annotations

import signal
from socketserver import ThreadingMixIn
from typing import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import click
from celery.bin.base import CeleryCommand, CeleryOption
from prometheus_client import CollectorRegistry, make_wsgi_app

from ..errors import one_line
from ..exporter import DEFAULT_INTERVAL, Exporter, registry
from .base import Target, obj_of, prefix_option, streams

DEFAULT_PORT = 9808
INDEX = b'celery_streams exporter: metrics at /metrics\n'
NOT_FOUND = b'not found: see /metrics\n'
TEXT = [('Content-Type', 'text/plain; charset=utf-8')]


class _Stop(BaseException):
    """SIGTERM: leave serve_forever like Ctrl-C does. A BaseException, as KeyboardInterrupt:
    a SIGTERM that lands while the main thread hands a scrape over (``socketserver`` catches
    ``Exception`` there) must not be swallowed, or the exporter serves on."""


class MetricsServer(ThreadingMixIn, WSGIServer):
    """A thread per scrape; a scrape in progress does not hold the shutdown."""

    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    """No line per scrape."""

    def log_message(self, format, *args):
        pass


def metrics_app(found: CollectorRegistry) -> Callable:
    """The WSGI app: prometheus_client's on ``/metrics``, a line on ``/``, 404 elsewhere.

    Every answer has its ``Content-Length``; HEAD gets the headers of GET, without the body.
    """
    metrics = make_wsgi_app(found)

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        head = environ['REQUEST_METHOD'] == 'HEAD'
        path = environ.get('PATH_INFO') or '/'
        said: list = []

        def keep(status: str, headers: list, exc_info=None) -> None:   # sent with the length
            said[:] = [status, headers]

        if path == '/metrics':
            body = b''.join(metrics(dict(environ, REQUEST_METHOD='GET') if head else environ, keep))
        else:
            said = ['200 OK' if path == '/' else '404 Not Found', TEXT]
            body = INDEX if path == '/' else NOT_FOUND
        status, headers = said
        start_response(status, [*headers, ('Content-Length', str(len(body)))])
        return [] if head else [body]

    return app


def serve(server: MetricsServer) -> None:
    """Serve until Ctrl-C or SIGTERM, then close the socket."""
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
    every queue under the prefix (names: docs/metrics.md), with the exporter's
    process metrics. A Redis that cannot be reached gives celery_streams_up 0,
    not an exit.
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
        server = make_server(address, port, metrics_app(registry(metrics)),
                             server_class=MetricsServer, handler_class=QuietHandler)
    except OSError as exc:
        raise click.ClickException('cannot listen on %s:%s: %s'
                                   % (address, port, one_line(exc))) from None
    host, bound = server.server_address[:2]
    obj.echo('Serving metrics of %s, group %r on http://%s:%s/metrics (collected at most every %ss)'
             % (target.describe(), target.group, host, bound, interval))
    serve(server)
    obj.echo('Exporter stopped.')
