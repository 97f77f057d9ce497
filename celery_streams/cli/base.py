"""What every ``celery streams`` command shares: the target Redis, one-line errors, options,
confirmation and the plan -> confirm -> apply shape, and the formatting of counts."""
from __future__ import annotations

import json
from contextlib import contextmanager
from difflib import get_close_matches
from typing import Callable, Literal, TextIO, cast

import click
import redis
from celery.bin.base import COMMA_SEPARATED_LIST, CeleryOption, CLIContext, handle_preload_options
from celery.exceptions import CeleryCommandException
from celery.platforms import EX_UNAVAILABLE

from ..diagnose import warn_command
from ..connection import (CLUSTER_SCHEMES, SENTINEL_SCHEME, broker_urls, client_from_url,
                          connection_kwargs, safe_url)
from ..errors import StreamsError, one_line
from ..inventory import Inventory, UnknownQueue
from ..keys import Keys
from ..options import Options

PREFIX_META = 'celery_streams.prefix'
RESERVED_NOTE = ('Note: messages a worker already reserved (prefetched into its memory) '
                 'may still run; they are acked as usual and never come back.')
DRY_RUN_NOTE = 'Dry run: nothing was changed.'
#: From this many entries to remove or clear on, an apply draws a progress bar on a terminal.
PROGRESS_MIN = 100_000
#: The exit status after Ctrl-C (128 + SIGINT, as a shell reports it).
EX_INTERRUPTED = 130
AGAIN = 'Run the same command again to finish the job.'


class Target:
    """The Redis of the app's broker, and the transport options that locate its keys."""

    def __init__(self, ctx: click.Context, prefix: str | None):
        app = ctx.obj.app
        warn_command(ctx)   # the app on kombu's lists (redis:// without broker_transport)
        urls = broker_urls(app.conf.broker_url)
        if not urls:
            raise click.ClickException(
                'no broker URL: pass --broker redis://host:6379/0 or -A an app that sets broker_url')
        # Sentinels: every one is asked for the master (as by the worker); cluster nodes: every
        # one is a seed; else the first server.
        if urls[0].split('://', 1)[0] not in (SENTINEL_SCHEME,) + CLUSTER_SCHEMES:
            urls = urls[:1]
        self.url = ';'.join(safe_url(url) for url in urls)
        transport_options = dict(app.conf.broker_transport_options or {})
        with one_line_errors(self.url):
            options = Options.from_transport_options(transport_options)
            self.client = client_from_url(urls, ssl=app.conf.broker_use_ssl,
                                          transport_options=transport_options)
        ctx.call_on_close(self.client.close)
        if prefix is None:
            prefix = ctx.meta.get(PREFIX_META)
        self.prefix = options.global_keyprefix if prefix is None else prefix
        self.group = options.consumer_group
        self.queues = ctx.params.get('queues') or []   # the command's -Q, for "did you mean"

    @contextmanager
    def errors(self):
        """:func:`one_line_errors` for this broker; an unknown -Q name gets the closest known one."""
        has_password = bool(connection_kwargs(self.client).get('password'))
        with one_line_errors(self.url, has_password):
            try:
                yield
            except UnknownQueue as exc:
                raise UnknownQueue(one_line(exc) + self.queue_hints()) from None

    def queue_hints(self) -> str:
        """' (did you mean 'celery'?)' for the -Q names that are close to a known queue, or ''."""
        known = Inventory(self.client, Keys(self.prefix)).all_queues()
        hints = [(name, close[0]) for name in self.queues if name not in known
                 for close in [get_close_matches(name, known, n=1, cutoff=0.6)] if close]
        if not hints:
            return ''
        if len(hints) == 1:
            return ' (did you mean %r?)' % hints[0][1]
        return ' (did you mean %s?)' % ', '.join('%r for %r' % (close, name) for name, close in hints)

    def describe(self) -> str:
        return 'broker %s, key prefix %r' % (self.url, self.prefix)


@contextmanager
def one_line_errors(where: str, has_password: bool = True):
    """Turn configuration and Redis errors into one line and a non-zero exit."""
    try:
        yield
    except StreamsError as exc:
        raise click.ClickException(one_line(exc)) from None
    except redis.AuthenticationError as exc:
        if not has_password:
            raise CeleryCommandException('Redis at %s requires a password and the URL has none'
                                         % where, EX_UNAVAILABLE) from None
        raise CeleryCommandException('Redis at %s refused the credentials: %s'
                                     % (where, one_line(exc)), EX_UNAVAILABLE) from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise CeleryCommandException('cannot reach Redis at %s: %s'
                                     % (where, one_line(exc)), EX_UNAVAILABLE) from None
    except redis.exceptions.NoPermissionError as exc:   # ACL: a command or key not allowed
        raise CeleryCommandException('Redis at %s refused the command: %s'
                                     % (where, one_line(exc)), EX_UNAVAILABLE) from None
    except redis.ResponseError as exc:
        raise click.ClickException('Redis at %s answered: %s' % (where, one_line(exc))) from None
    except redis.RedisError as exc:
        raise click.ClickException('Redis at %s: %s' % (where, one_line(exc))) from None


def obj_of(ctx: click.Context) -> CLIContext:
    if ctx.obj is None:   # the group used without `celery`
        ctx.obj = CLIContext(app=None, no_color=False, workdir=None)
    return ctx.obj


def prefix_option(command):
    return click.option(
        '--prefix', cls=CeleryOption, default=None, help_group='Streams Options',
        help="Key prefix (global_keyprefix) to work on; default: the app's "
             "broker_transport_options.")(command)


def force_option(group: str):
    return click.option('-f', '--force', '-y', '--yes', 'force', cls=CeleryOption, is_flag=True,
                        help_group=group, help="Don't prompt for confirmation.")


def dry_run_option(group: str, what: str):
    return click.option('--dry-run', cls=CeleryOption, is_flag=True, help_group=group,
                        help='Show what would be %s; change nothing.' % what)


def text_stream(name: Literal['stdin', 'stdout', 'stderr']) -> TextIO:
    """``click.get_text_stream(name)``, typed: Click 8.5 deprecated it and serves it from a
    module ``__getattr__`` that type checkers see as ``object``. Looked up at each call."""
    return cast('Callable[[str], TextIO]', click.get_text_stream)(name)


def confirm(obj: CLIContext, action: str, force: bool, target: Target, what: str) -> None:
    """Ask like ``celery purge``; without a terminal, refuse unless --force."""
    if force:
        return
    if not text_stream('stdin').isatty():
        raise click.ClickException(
            'refusing to %s without confirmation: stdin is not a terminal '
            '(pass -f/--force or -y/--yes to skip the prompt, or --dry-run to see what it would do)'
            % action)
    click.confirm('%s: %s\n         (%s)\n         There is no undo for this operation!\n\n'
                  '(to skip this prompt use the -f option)\nAre you sure?'
                  % (obj.style('WARNING', fg='red'), what, target.describe()), abort=True)


def plan_confirm_apply(obj: CLIContext, target: Target, *, plan, dry_run: bool, force: bool,
                       action: str, what, apply):
    """The one shape of every destructive command: plan, show, confirm, apply that plan.

    ``plan()`` finds what would change (nothing is changed); ``what(plan)``
    says it in a sentence, or None when it changes nothing. Unless this is a
    dry run or there is nothing to do, the user confirms that sentence and
    ``apply(plan)`` does exactly that plan -- never what a second look would
    find (keys or messages created after the prompt are left alone).
    Returns ``(plan, done)``; ``done`` is None when nothing was applied.
    Ctrl-C exits with status 130, saying that nothing was changed, or (an
    ``apply`` under :func:`interruptible`) how far it got.
    """
    applying = False
    try:
        with target.errors():
            planned = plan()
            sentence = what(planned) if planned else None
            if sentence is None or dry_run:
                return planned, None
            confirm(obj, action, force, target, sentence)
            applying = True
            return planned, apply(planned)
    except KeyboardInterrupt:
        click.echo('Interrupted: %s' % ('part of it may be done. ' + AGAIN if applying
                                        else 'nothing was changed.'), err=True)
        raise click.exceptions.Exit(EX_INTERRUPTED) from None


class Tally:
    """A ``progress(n)`` callback that counts what an apply reported (and draws its bar)."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.bar: Callable[[int], None] | None = None

    def __call__(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar(n)


@contextmanager
def interruptible(total: int, label: str, what: str, again: str = AGAIN):
    """The ``progress`` of an apply: a :class:`Tally` drawing a :func:`progress_bar`.

    On Ctrl-C, says on stderr how much was done (``what``: what the counts
    count, e.g. 'entries removed') and exits with status 130: each bounded
    step is done for good, so running the command again finishes the job.
    """
    tally = Tally(total)
    try:
        with progress_bar(total, label) as bar:
            tally.bar = bar
            yield tally
    except KeyboardInterrupt:
        click.echo('Interrupted: %s of %s %s so far (a step under way may have finished too). %s'
                   % (tally.done, total, what, again), err=True)
        raise click.exceptions.Exit(EX_INTERRUPTED) from None


@contextmanager
def progress_bar(total: int, label: str, file=None):
    """A ``progress(n)`` callback for the admin functions that draws a bar, or None.

    The bar is drawn only when the output (``file``, default stdout) is a
    terminal and ``total`` (entries the plan removes or clears) is at least
    :data:`PROGRESS_MIN`: piped output is the report alone.
    """
    out = file if file is not None else text_stream('stdout')
    if total < PROGRESS_MIN or not out.isatty():
        yield None
        return
    with click.progressbar(length=total, label=label, file=out, show_pos=True) as bar:
        yield bar.update


@click.group(name='streams')
@prefix_option
@click.pass_context
@handle_preload_options
def streams(ctx, prefix, **kwargs):
    """Inspect and reset the Redis Streams queues of celery_streams."""
    obj_of(ctx)
    ctx.meta[PREFIX_META] = prefix


def cell(value):
    return '-' if value is None else str(value)


def seconds(value):
    return '-' if value is None else '%.1fs' % value


def count(n, singular, plural=None):
    return '%s %s' % (n, singular if n == 1 else plural or singular + 's')


def age(seconds) -> str:
    if seconds is None:
        return '-'
    if seconds < 60:
        return '%.1fs' % seconds
    minutes, hours, days = int(seconds // 60), int(seconds // 3600), int(seconds // 86400)
    if hours < 1:
        return '%dm%02ds' % (minutes, seconds % 60)
    if days < 1:
        return '%dh%02dm' % (hours, minutes % 60)
    return '%dd%02dh' % (days, hours % 24)


def queues_option(group: str, default: str):
    return click.option('-Q', '--queues', cls=CeleryOption, type=COMMA_SEPARATED_LIST, help_group=group,
                        help='Comma separated queue names; default: %s.' % default)


def listing_json(target: Target, limit, queues) -> str:
    """The JSON document of a listing command (``dead-letters list``, ``scheduled``)."""
    return json.dumps({'broker': target.url, 'global_keyprefix': target.prefix or '',
                       'namespace': Keys(target.prefix).prefix, 'limit': limit or None,
                       'queues': [q.as_dict() for q in queues]}, indent=2)
