"""``celery streams``: inspect, drain and reset celery_streams' queues.

::

    celery -A proj streams status [-Q a,b] [--json]
    celery -A proj streams drain  [-Q a,b] [-f] [--dry-run] [--include-broadcast] [--dead-letters]
    celery -A proj streams nuke   [-f] [--dry-run] [--keep-dead-letters]
    celery --broker redis://host:6379/0 streams [--prefix P] status

The broker URL, ``global_keyprefix`` and ``consumer_group`` come from the app
(``broker_url``, ``broker_transport_options``, ``broker_use_ssl``); without an
app, pass ``--broker``. ``--prefix`` (on ``streams`` or on a subcommand)
overrides the key prefix. The commands are thin: the work is done by
:mod:`celery_streams.admin`. Errors are one line on stderr; exit status 1,
or 69 (``EX_UNAVAILABLE``) when Redis cannot be reached or refuses the
credentials.

``status --json`` prints one JSON document::

    {
      "broker": "redis://:**@127.0.0.1:6379/0",    # password masked
      "server": {"flavor": "redis", "version": "7.0.15"},
      "global_keyprefix": "proj:",
      "namespace": "proj:celery-streams:",          # every key starts with this
      "consumer_group": "celery",                   # the transport's group
      "schema": 1,                                  # or null when no worker ever ran
      "queues": [
        {
          "name": "celery",
          "kind": "task",                   # "task" | "fanout" | null (not in the registry)
          "stream": "proj:celery-streams:q:{celery}",
          "streams": ["proj:celery-streams:q:{celery}",      # existing streams: bucket 0,
                      "proj:celery-streams:q:{celery}:p3"],  # then priority buckets
          "exists": true,                   # the queue has a stream
          "length": 12,                     # XLEN, summed over the streams
          "waiting": 9,                     # task: XLEN - pending of consumer_group, summed;
                                            # fanout: lag of consumer_group (null before 7.0)
          "pending": 3,                     # pending entries of consumer_group, summed
          "oldest_pending_age": 41.5,       # seconds, oldest pending entry of any group, or null
          "dead_letters": 0,                # XLEN of the queue's dead-letter stream
          "groups": [                       # one per consumer group of each stream
            {
              "name": "celery",
              "stream": "proj:celery-streams:q:{celery}",
              "bucket": 0,                  # priority bucket of that stream
              "consumers": [{"name": "host:123:1a2b", "pending": 3, "idle_ms": 1520,
                             "alive": true}],   # liveness key present; null on broadcast queues
              "pending": 3,
              "last_delivered_id": "1700000000000-0",
              "entries_read": 12,           # null before Redis 7.0
              "lag": 0,                     # null before Redis 7.0, or when unknown
              "oldest_pending_age": 41.5    # seconds, or null
            }
          ]
        }
      ]
    }

Ages are measured with the server's clock (``TIME``) from the time part of
the oldest pending entry id (when the message was published or put back).
"""
from __future__ import annotations

import json
from contextlib import contextmanager

import click
import redis
from celery.bin.base import (COMMA_SEPARATED_LIST, CeleryCommand, CeleryOption, CLIContext,
                             handle_preload_options)
from celery.exceptions import CeleryCommandException
from celery.platforms import EX_UNAVAILABLE

from . import admin
from .errors import StreamsError
from .keys import Keys
from .options import Options

PREFIX_META = 'celery_streams.prefix'
RESERVED_NOTE = ('Note: messages a worker already reserved (prefetched into its memory) '
                 'may still run; they are acked as usual and never come back.')
DRY_RUN_NOTE = 'Dry run: nothing was changed.'


class Target:
    """The Redis of the app's broker, and the transport options that locate its keys."""

    def __init__(self, ctx: click.Context, prefix: str | None):
        app = ctx.obj.app
        url = admin.first_url(app.conf.broker_url)
        if not url:
            raise click.ClickException(
                'no broker URL: pass --broker redis://host:6379/0 or -A an app that sets broker_url')
        self.url = admin.safe_url(url)
        transport_options = dict(app.conf.broker_transport_options or {})
        with one_line_errors(self.url):
            options = Options.from_transport_options(transport_options)
            self.client = admin.client_from_url(url, ssl=app.conf.broker_use_ssl,
                                                transport_options=transport_options)
        ctx.call_on_close(self.client.close)
        if prefix is None:
            prefix = ctx.meta.get(PREFIX_META)
        self.prefix = options.global_keyprefix if prefix is None else prefix
        self.group = options.consumer_group

    def errors(self):
        """:func:`one_line_errors` for this broker."""
        has_password = bool(self.client.connection_pool.connection_kwargs.get('password'))
        return one_line_errors(self.url, has_password)

    def describe(self) -> str:
        return 'broker %s, key prefix %r' % (self.url, self.prefix)


@contextmanager
def one_line_errors(where: str, has_password: bool = True):
    """Turn configuration and Redis errors into one line and a non-zero exit."""
    try:
        yield
    except StreamsError as exc:
        raise click.ClickException(_first_line(exc)) from None
    except redis.AuthenticationError as exc:
        if not has_password:
            raise CeleryCommandException('Redis at %s requires a password and the URL has none'
                                         % where, EX_UNAVAILABLE) from None
        raise CeleryCommandException('Redis at %s refused the credentials: %s'
                                     % (where, _first_line(exc)), EX_UNAVAILABLE) from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise CeleryCommandException('cannot reach Redis at %s: %s'
                                     % (where, _first_line(exc)), EX_UNAVAILABLE) from None
    except redis.exceptions.NoPermissionError as exc:   # ACL: a command or key not allowed
        raise CeleryCommandException('Redis at %s refused the command: %s'
                                     % (where, _first_line(exc)), EX_UNAVAILABLE) from None
    except redis.ResponseError as exc:
        raise click.ClickException('Redis at %s answered: %s' % (where, _first_line(exc))) from None
    except redis.RedisError as exc:
        raise click.ClickException('Redis at %s: %s' % (where, _first_line(exc))) from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _obj(ctx: click.Context) -> CLIContext:
    if ctx.obj is None:   # the group used without `celery`
        ctx.obj = CLIContext(app=None, no_color=False, workdir=None)
    return ctx.obj


def prefix_option(command):
    return click.option(
        '--prefix', cls=CeleryOption, default=None, help_group='Streams Options',
        help="Key prefix (global_keyprefix) to work on; default: the app's "
             "broker_transport_options.")(command)


def confirm(obj: CLIContext, action: str, force: bool, target: Target, what: str) -> None:
    """Ask like ``celery purge``; without a terminal, refuse unless --force."""
    if force:
        return
    if not click.get_text_stream('stdin').isatty():
        raise click.ClickException(
            'refusing to %s without confirmation: stdin is not a terminal '
            '(pass -f/--force to skip the prompt, or --dry-run to see what it would do)' % action)
    click.confirm('%s: %s\n         (%s)\n         There is no undo for this operation!\n\n'
                  '(to skip this prompt use the -f option)\nAre you sure?'
                  % (obj.style('WARNING', fg='red'), what, target.describe()), abort=True)


@click.group(name='streams')
@prefix_option
@click.pass_context
@handle_preload_options
def streams(ctx, prefix, **kwargs):
    """Inspect and reset the Redis Streams queues of celery_streams."""
    _obj(ctx)
    ctx.meta[PREFIX_META] = prefix


# -- drain --------------------------------------------------------------------

@streams.command(cls=CeleryCommand)
@click.option('-Q', '--queues', cls=CeleryOption, type=COMMA_SEPARATED_LIST, help_group='Drain Options',
              help='Comma separated queue names; default: every task queue in the registry.')
@click.option('-f', '--force', cls=CeleryOption, is_flag=True, help_group='Drain Options',
              help="Don't prompt for confirmation.")
@click.option('--dry-run', cls=CeleryOption, is_flag=True, help_group='Drain Options',
              help='Show what would be removed; change nothing.')
@click.option('--include-broadcast', cls=CeleryOption, is_flag=True, help_group='Drain Options',
              help='Drain broadcast (fanout) queues too.')
@click.option('--dead-letters', cls=CeleryOption, is_flag=True, help_group='Drain Options',
              help="Empty the queues' dead-letter streams too.")
@prefix_option
@click.pass_context
def drain(ctx, queues, force, dry_run, include_broadcast, dead_letters, prefix, **kwargs):
    """Remove every message, pending ones included, from task queues.

    The streams and their consumer groups stay, so running workers read on.
    """
    obj = _obj(ctx)
    target = Target(ctx, prefix)
    with target.errors():
        plan = admin.drain(target.client, global_keyprefix=target.prefix, queues=queues,
                           include_broadcast=include_broadcast, dead_letters=dead_letters,
                           dry_run=True)
        if plan and not dry_run:
            confirm(obj, 'drain', force, target, 'This will remove %s and %s from %s: %s.' % (
                _count(sum(d.removed for d in plan), 'message'),
                _count(sum(d.pending_cleared for d in plan), 'pending entry', 'pending entries'),
                _count(len(plan), 'queue'), ', '.join(d.queue for d in plan)))
            done = admin.drain(target.client, global_keyprefix=target.prefix,
                               queues=[d.queue for d in plan], include_broadcast=True,
                               dead_letters=dead_letters)
    obj.echo(target.describe())
    if not plan:
        obj.echo('No %squeues in the registry: nothing to drain.'
                 % ('' if include_broadcast else 'task '))
    elif dry_run:
        _echo_drained(obj, plan, 'Would drain')
        obj.echo(DRY_RUN_NOTE)
    else:
        _echo_drained(obj, done, 'Drained')
        obj.echo(RESERVED_NOTE)


def _echo_drained(obj, drained, verb):
    for d in drained:
        line = '%s queue %r (%s%s): %s, %s' % (
            verb, d.queue, d.kind or 'not in registry',
            ', %d priority streams' % len(d.streams) if len(d.streams) > 1 else '',
            _count(d.removed, 'message'), _count(d.pending_cleared, 'pending entry', 'pending entries'))
        if d.dead_letters_removed is not None:
            line += ', %s' % _count(d.dead_letters_removed, 'dead letter')
        line += '; groups kept: %s' % (', '.join(d.groups_kept) or 'none')
        obj.echo(line)
    obj.echo('Total: %s and %s from %s.' % (
        _count(sum(d.removed for d in drained), 'message'),
        _count(sum(d.pending_cleared for d in drained), 'pending entry', 'pending entries'),
        _count(len(drained), 'queue')))


# -- nuke ---------------------------------------------------------------------

@streams.command(cls=CeleryCommand)
@click.option('-f', '--force', cls=CeleryOption, is_flag=True, help_group='Nuke Options',
              help="Don't prompt for confirmation.")
@click.option('--dry-run', cls=CeleryOption, is_flag=True, help_group='Nuke Options',
              help='Show what would be destroyed; change nothing.')
@click.option('--keep-dead-letters', cls=CeleryOption, is_flag=True, help_group='Nuke Options',
              help='Keep the dead-letter streams.')
@prefix_option
@click.pass_context
def nuke(ctx, force, dry_run, keep_dead_letters, prefix, **kwargs):
    """Destroy every consumer group and delete every key under the prefix.

    Only keys under <prefix>celery-streams: are touched (found with SCAN).
    Stop the workers first: running ones re-create their queues.
    """
    obj = _obj(ctx)
    target = Target(ctx, prefix)
    namespace = Keys(target.prefix).prefix
    with target.errors():
        plan = admin.nuke(target.client, global_keyprefix=target.prefix,
                          keep_dead_letters=keep_dead_letters, dry_run=True)
        if plan.deleted_keys and not dry_run:
            confirm(obj, 'nuke', force, target, 'This will destroy %s and delete %s under %r.' % (
                _count(len(plan.groups), 'consumer group'), _count(len(plan.deleted_keys), 'key'),
                namespace))
            done = admin.nuke(target.client, global_keyprefix=target.prefix,
                              keep_dead_letters=keep_dead_letters)
    obj.echo(target.describe())
    if not plan.deleted_keys:
        obj.echo('No keys under %r: nothing to nuke.' % namespace)
    elif dry_run:
        _echo_nuked(obj, plan, 'Would destroy')
        obj.echo(DRY_RUN_NOTE)
    else:
        _echo_nuked(obj, done, 'Destroyed')
        obj.echo('Note: workers still running re-create the groups of the queues they consume.')


def _echo_nuked(obj, result, verb):
    obj.echo('%s %s, %s and %s.' % (
        verb, _count(len(result.groups), 'consumer group'), _count(len(result.streams), 'stream'),
        _count(len(result.other_keys), 'other key')))
    for stream, group in result.groups:
        obj.echo('  group  %s on %s' % (group, stream))
    for key in result.streams:
        obj.echo('  stream %s' % key)
    for key in result.other_keys:
        obj.echo('  key    %s' % key)
    for key in result.kept:
        obj.echo('  kept   %s' % key)


# -- status -------------------------------------------------------------------

@streams.command(cls=CeleryCommand)
@click.option('-Q', '--queues', cls=CeleryOption, type=COMMA_SEPARATED_LIST, help_group='Status Options',
              help='Comma separated queue names; default: every queue found.')
@click.option('--json', 'as_json', cls=CeleryOption, is_flag=True, help_group='Status Options',
              help='Print one JSON document (shape: see docs/cli.md).')
@prefix_option
@click.pass_context
def status(ctx, queues, as_json, prefix, **kwargs):
    """Show queues, consumer groups, consumers, pending entries and dead letters."""
    obj = _obj(ctx)
    target = Target(ctx, prefix)
    with target.errors():
        doc = admin.status(target.client, global_keyprefix=target.prefix,
                           consumer_group=target.group, queues=queues)
    doc = dict(broker=target.url, **doc)
    if as_json:
        obj.echo(json.dumps(doc, indent=2))
    else:
        _echo_status_table(obj, doc)


def _echo_status_table(obj, doc):
    server = doc['server']
    obj.echo('%s, %s %s, keys under %r, group %r' % (
        doc['broker'], server['flavor'], server['version'], doc['namespace'], doc['consumer_group']))
    if not doc['queues']:
        obj.echo('No queues.')
        return
    rows = [('QUEUE', 'KIND', 'WAITING', 'LENGTH', 'PENDING', 'OLDEST', 'DEAD')]
    for q in doc['queues']:
        rows.append((q['name'], q['kind'] or '?', _cell(q['waiting']), _cell(q['length']),
                     _cell(q['pending']), _seconds(q['oldest_pending_age']), _cell(q['dead_letters'])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        line = '  '.join(cell.ljust(w) if i < 2 else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(row, widths)))
        obj.echo(obj.style(line, bold=True) if n == 0 else line)
        if n:
            _echo_groups(obj, doc['queues'][n - 1])


def _echo_groups(obj, queue):
    if not queue['exists']:
        obj.echo('    (no stream)')
    for g in queue['groups']:
        obj.echo('    group %s%s: %s, pending %s, last delivered %s, entries read %s, lag %s, oldest %s'
                 % (g['name'], ' (priority bucket %s)' % g['bucket'] if g['bucket'] else '',
                    _count(len(g['consumers']), 'consumer'), g['pending'], g['last_delivered_id'],
                    _cell(g['entries_read']), _cell(g['lag']), _seconds(g['oldest_pending_age'])))
        for c in g['consumers']:
            alive = {True: ', alive', False: ', no liveness key', None: ''}[c['alive']]
            obj.echo('      consumer %s: pending %s, idle %s ms%s'
                     % (c['name'], c['pending'], c['idle_ms'], alive))


def _cell(value):
    return '-' if value is None else str(value)


def _seconds(value):
    return '-' if value is None else '%.1fs' % value


def _count(n, singular, plural=None):
    return '%s %s' % (n, singular if n == 1 else plural or singular + 's')
