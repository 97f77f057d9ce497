"""``celery streams``: inspect, drain and reset celery_streams' queues.

::

    celery -A proj streams status [-Q a,b] [--json]
    celery -A proj streams drain  [-Q a,b] [-f] [--dry-run] [--include-broadcast] [--dead-letters]
    celery -A proj streams nuke   [-f] [--dry-run] [--keep-dead-letters]
    celery -A proj streams dead-letters list    [-Q a,b] [--json] [--limit N]
    celery -A proj streams dead-letters requeue [-Q a,b] [--id ID ...] [-f] [--dry-run]
    celery -A proj streams dead-letters purge   [-Q a,b] [-f] [--dry-run]
    celery --broker redis://host:6379/0 streams [--prefix P] status

The broker URL, ``global_keyprefix`` and ``consumer_group`` come from the app
(``broker_url``, ``broker_transport_options``, ``broker_use_ssl``); without an
app, pass ``--broker``. ``--prefix`` (on ``streams`` or on a subcommand)
overrides the key prefix. The commands are thin: the work is done by
:mod:`celery_streams.admin`. Errors are one line on stderr; exit status 1,
or 69 (``EX_UNAVAILABLE``) when Redis cannot be reached or refuses the
credentials.

``status --json`` and ``dead-letters list --json`` print one JSON document
each; their shapes are in docs/cli.md (``Status.as_dict()`` and
``DeadLetterQueue.as_dict()`` build them). Ages are measured with the
server's clock (``TIME``).

Every destructive command has one shape (:func:`plan_confirm_apply`): plan,
show, confirm like ``celery purge`` (or ``-f``; ``--dry-run`` stops after
showing), then apply exactly what was shown.
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
from .connection import client_from_url, first_url, safe_url
from .errors import StreamsError, one_line
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
        url = first_url(app.conf.broker_url)
        if not url:
            raise click.ClickException(
                'no broker URL: pass --broker redis://host:6379/0 or -A an app that sets broker_url')
        self.url = safe_url(url)
        transport_options = dict(app.conf.broker_transport_options or {})
        with one_line_errors(self.url):
            options = Options.from_transport_options(transport_options)
            self.client = client_from_url(url, ssl=app.conf.broker_use_ssl,
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


def _obj(ctx: click.Context) -> CLIContext:
    if ctx.obj is None:   # the group used without `celery`
        ctx.obj = CLIContext(app=None, no_color=False, workdir=None)
    return ctx.obj


def prefix_option(command):
    return click.option(
        '--prefix', cls=CeleryOption, default=None, help_group='Streams Options',
        help="Key prefix (global_keyprefix) to work on; default: the app's "
             "broker_transport_options.")(command)


def force_option(group: str):
    return click.option('-f', '--force', cls=CeleryOption, is_flag=True, help_group=group,
                        help="Don't prompt for confirmation.")


def dry_run_option(group: str, what: str):
    return click.option('--dry-run', cls=CeleryOption, is_flag=True, help_group=group,
                        help='Show what would be %s; change nothing.' % what)


def confirm(obj: CLIContext, action: str, force: bool, target: Target, what: str) -> None:
    """Ask like ``celery purge``; without a terminal, refuse unless --force."""
    if force:
        return
    if not click.get_text_stream('stdin').isatty():  # type: ignore[operator]
        raise click.ClickException(
            'refusing to %s without confirmation: stdin is not a terminal '
            '(pass -f/--force to skip the prompt, or --dry-run to see what it would do)' % action)
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
    """
    with target.errors():
        planned = plan()
        sentence = what(planned) if planned else None
        if sentence is None or dry_run:
            return planned, None
        confirm(obj, action, force, target, sentence)
        return planned, apply(planned)


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
@force_option('Drain Options')
@dry_run_option('Drain Options', 'removed')
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
    plan, done = plan_confirm_apply(
        obj, target, dry_run=dry_run, force=force, action='drain',
        plan=lambda: admin.drain(target.client, global_keyprefix=target.prefix, queues=queues,
                                 include_broadcast=include_broadcast, dead_letters=dead_letters,
                                 dry_run=True),
        what=lambda plan: 'This will remove %s and %s from %s: %s.' % (
            _count(sum(d.removed for d in plan), 'message'),
            _count(sum(d.pending_cleared for d in plan), 'pending entry', 'pending entries'),
            _count(len(plan), 'queue'), ', '.join(d.queue for d in plan)),
        apply=lambda plan: admin.apply_drain(target.client, plan, global_keyprefix=target.prefix))
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
@force_option('Nuke Options')
@dry_run_option('Nuke Options', 'destroyed')
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
    plan, done = plan_confirm_apply(
        obj, target, dry_run=dry_run, force=force, action='nuke',
        plan=lambda: admin.nuke(target.client, global_keyprefix=target.prefix,
                                keep_dead_letters=keep_dead_letters, dry_run=True),
        what=lambda plan: 'This will destroy %s and delete %s under %r.' % (
            _count(len(plan.groups), 'consumer group'), _count(len(plan.deleted_keys), 'key'),
            namespace) if plan.deleted_keys else None,
        apply=lambda plan: admin.apply_nuke(target.client, plan, global_keyprefix=target.prefix))
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
        found = admin.status(target.client, global_keyprefix=target.prefix,
                             consumer_group=target.group, queues=queues)
    doc = dict(broker=target.url, **found.as_dict())
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


# -- dead letters -----------------------------------------------------------------

DEAD_LETTER_LIMIT = 100
UNDECODABLE_NOTE = 'undecodable payload: a worker will dead-letter it again'


def _queues_option(group):
    return click.option('-Q', '--queues', cls=CeleryOption, type=COMMA_SEPARATED_LIST, help_group=group,
                        help='Comma separated queue names; default: every queue with dead letters.')


@streams.group(name='dead-letters')
@click.pass_context
def dead_letters(ctx, **kwargs):
    """List, requeue or purge the dead letters of queues."""
    _obj(ctx)


@dead_letters.command(name='list', cls=CeleryCommand)
@_queues_option('List Options')
@click.option('--json', 'as_json', cls=CeleryOption, is_flag=True, help_group='List Options',
              help='Print one JSON document (shape: see docs/cli.md).')
@click.option('--limit', cls=CeleryOption, type=click.IntRange(min=0), default=DEAD_LETTER_LIMIT,
              show_default=True, help_group='List Options',
              help='Show at most this many dead letters per queue, the oldest first; 0: all.')
@prefix_option
@click.pass_context
def list_dead_letters(ctx, queues, as_json, limit, prefix, **kwargs):
    """Show each dead letter: id, age, reason, source, task, payload size."""
    obj = _obj(ctx)
    target = Target(ctx, prefix)
    with target.errors():
        found = admin.dead_letters(target.client, global_keyprefix=target.prefix, queues=queues,
                                   limit=limit)
    if as_json:
        obj.echo(json.dumps({
            'broker': target.url, 'global_keyprefix': target.prefix or '',
            'namespace': Keys(target.prefix).prefix, 'limit': limit or None,
            'queues': [q.as_dict() for q in found]}, indent=2))
        return
    obj.echo(target.describe())
    if not found:
        obj.echo('No dead letters.')
        return
    keys = Keys(target.prefix)
    for q in found:
        obj.echo(obj.style('Queue %r: %s (%s)' % (q.queue, _count(q.count, 'dead letter'), q.stream),
                           bold=True))
        if not q.dead_letters:
            continue
        rows = [('ID', 'AGE', 'SOURCE ID', 'TASK', 'TASK ID', 'SIZE', 'REASON')]
        for d in q.dead_letters:
            rows.append((d.id, _age(d.age), _source(d, keys), d.task or '-', d.task_id or '-',
                         _cell(d.payload_size), _cell(d.reason)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            obj.echo('  ' + '  '.join(cell.rjust(w) if i in (1, 5) else cell.ljust(w)
                                      for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
        if q.truncated:
            obj.echo('  ... %s more (--limit 0 shows all)' % (q.count - len(q.dead_letters)))


@dead_letters.command(cls=CeleryCommand)
@_queues_option('Requeue Options')
@click.option('--id', 'ids', cls=CeleryOption, multiple=True, help_group='Requeue Options',
              help='Requeue only this dead letter (its id in `dead-letters list`); repeatable, '
                   'or comma separated.')
@force_option('Requeue Options')
@dry_run_option('Requeue Options', 'requeued')
@prefix_option
@click.pass_context
def requeue(ctx, queues, ids, force, dry_run, prefix, **kwargs):
    """Move dead letters back to their queues.

    Each one goes back to the stream it came from, with its original fields
    but `deliveries` (max_deliveries counts afresh), and is deleted from the
    dead letters, atomically. Undecodable ones go back too: a worker
    dead-letters them again.
    """
    obj = _obj(ctx)
    target = Target(ctx, prefix)
    ids = [i for value in ids for i in value.split(',') if i.strip()]

    def what(plan):
        movable = [item for item in plan if item.outcome != 'empty']
        if not movable:
            return None
        names = list(dict.fromkeys(item.dead_letter.queue for item in movable))
        return 'This will move %s of %s (%s) back to their queues, delivery counts reset.' % (
            _count(len(movable), 'dead letter'), _count(len(names), 'queue'), ', '.join(names))

    plan, _ = plan_confirm_apply(
        obj, target, dry_run=dry_run, force=force, action='requeue', what=what,
        plan=lambda: admin.requeue_dead_letters(target.client, global_keyprefix=target.prefix,
                                                queues=queues, ids=ids, dry_run=True),
        apply=lambda plan: admin.apply_requeue(target.client, plan, global_keyprefix=target.prefix))
    obj.echo(target.describe())
    if not plan:
        obj.echo('No dead letters: nothing to requeue.')
        return
    for item in plan:
        obj.echo(_requeue_line(item))
    requeued = [i for i in plan if i.outcome in ('requeued', 'would requeue')]
    obj.echo('Total: %s %s %s.' % (
        _count(len(requeued), 'dead letter'), 'would be requeued' if dry_run else 'requeued',
        'from ' + _count(len({i.dead_letter.queue for i in requeued}), 'queue')))
    if dry_run:
        obj.echo(DRY_RUN_NOTE)


def _requeue_line(item) -> str:
    d = item.dead_letter
    verb = {'requeued': 'Requeued', 'would requeue': 'Would requeue', 'gone': 'Skipped',
            'empty': 'Skipped'}[item.outcome]
    line = '%s dead letter %s of queue %r' % (verb, d.id, d.queue)
    if item.outcome == 'gone':
        return line + ': no longer there (requeued or purged meanwhile)'
    if item.outcome == 'empty':
        return line + ': it holds no original field to put back'
    line += ' to %s' % item.stream
    if item.new_id:
        line += ' as %s' % item.new_id
    if item.fallback:
        line += ' (its source stream is %s: the queue\'s main stream instead)' % (
            'not recorded' if d.source_stream is None else 'not a stream of this queue')
    if d.task:
        line += ': task %s[%s]' % (d.task, d.task_id or '?')
    if not d.decodable:
        line += ' (%s)' % UNDECODABLE_NOTE
    return line


@dead_letters.command(cls=CeleryCommand)
@_queues_option('Purge Options')
@force_option('Purge Options')
@dry_run_option('Purge Options', 'deleted')
@prefix_option
@click.pass_context
def purge(ctx, queues, force, dry_run, prefix, **kwargs):
    """Delete the dead letters of queues (their dead-letter streams)."""
    obj = _obj(ctx)
    target = Target(ctx, prefix)
    plan, done = plan_confirm_apply(
        obj, target, dry_run=dry_run, force=force, action='purge dead letters',
        plan=lambda: admin.purge_dead_letters(target.client, global_keyprefix=target.prefix,
                                              queues=queues, dry_run=True),
        what=lambda plan: 'This will delete %s of %s: %s.' % (
            _count(sum(p.removed for p in plan), 'dead letter'),
            _count(len(plan), 'queue'), ', '.join(p.queue for p in plan)),
        apply=lambda plan: admin.apply_purge(target.client, plan))
    obj.echo(target.describe())
    if not plan:
        obj.echo('No dead letters: nothing to purge.')
        return
    result, verb = (plan, 'Would delete') if dry_run else (done, 'Deleted')
    for p in result:
        obj.echo('%s %s of queue %r (%s)' % (verb, _count(p.removed, 'dead letter'), p.queue, p.stream))
    obj.echo('Total: %s from %s.' % (_count(sum(p.removed for p in result), 'dead letter'),
                                     _count(len(result), 'queue')))
    if dry_run:
        obj.echo(DRY_RUN_NOTE)


def _source(d, keys: Keys) -> str:
    if d.source_id is None:
        return '-'
    info = keys.parse(d.source_stream) if d.source_stream else None
    if info is not None and info.role == 'stream' and info.detail:
        return '%s (p%s)' % (d.source_id, info.detail)
    return d.source_id


def _age(seconds) -> str:
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
