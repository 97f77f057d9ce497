"""``celery streams drain | nuke | status``."""
from __future__ import annotations

import json
from time import monotonic, sleep, strftime

import click
from celery.bin.base import CeleryCommand, CeleryOption

from .. import admin
from ..diagnose import echo_notes
from ..keys import FANOUT, Keys
from .limits import format_table
from .base import (DRY_RUN_NOTE, RESERVED_NOTE, Target, age, cell, count, dry_run_option, force_option,
                   interruptible, obj_of, plan_confirm_apply, prefix_option, queues_option, seconds,
                   streams, text_stream)

# -- drain --------------------------------------------------------------------

DRAINED = 'entries removed or acked (messages, pending entries, dead letters, scheduled messages)'

@streams.command(cls=CeleryCommand)
@queues_option('Drain Options', 'every task queue in the registry')
@force_option('Drain Options')
@dry_run_option('Drain Options', 'removed')
@click.option('--include-broadcast', cls=CeleryOption, is_flag=True, help_group='Drain Options',
              help='Drain broadcast (fanout) queues too.')
@click.option('--dead-letters', cls=CeleryOption, is_flag=True, help_group='Drain Options',
              help="Empty the queues' dead-letter streams too.")
@click.option('--keep-scheduled', cls=CeleryOption, is_flag=True, help_group='Drain Options',
              help='Keep the messages waiting for their ETA (the queues\' schedules).')
@prefix_option
@click.pass_context
def drain(ctx, queues, force, dry_run, include_broadcast, dead_letters, keep_scheduled, prefix,
          **kwargs):
    """Remove every message, pending and scheduled ones included, from task queues.

    The streams and their consumer groups stay, so running workers read on.
    """
    obj = obj_of(ctx)
    target = Target(ctx, prefix)

    def apply(plan):
        total = sum(d.removed + d.pending_cleared + (d.dead_letters_removed or 0)
                    + (d.scheduled_removed or 0) for d in plan)
        with interruptible(total, 'Draining', DRAINED) as progress:
            return admin.apply_drain(target.client, plan, global_keyprefix=target.prefix,
                                     progress=progress)

    plan, done = plan_confirm_apply(
        obj, target, dry_run=dry_run, force=force, action='drain',
        plan=lambda: admin.drain(target.client, global_keyprefix=target.prefix, queues=queues,
                                 include_broadcast=include_broadcast, dead_letters=dead_letters,
                                 keep_scheduled=keep_scheduled, dry_run=True),
        what=lambda plan: 'This will remove %s%s and %s from %s: %s.' % (
            count(sum(d.removed for d in plan), 'message'), _scheduled_part(plan),
            count(sum(d.pending_cleared for d in plan), 'pending entry', 'pending entries'),
            count(len(plan), 'queue'), ', '.join(d.queue for d in plan)) if _removes(plan) else None,
        apply=apply)
    obj.echo(target.describe())
    if not plan:
        obj.echo('No %squeues in the registry: nothing to drain.'
                 % ('' if include_broadcast else 'task '))
        echo_notes(target.client, target.prefix)   # kombu's lists, other dbs or prefixes
    elif not dry_run and done is None:   # nothing to remove: no question asked
        obj.echo('Nothing to drain in %s: %s.' % (count(len(plan), 'queue'),
                                                  ', '.join(d.queue for d in plan)))
    elif dry_run:
        _echo_drained(obj, plan, 'Would drain')
        obj.echo(DRY_RUN_NOTE)
    else:
        _echo_drained(obj, done, 'Drained')
        obj.echo(RESERVED_NOTE)


def _removes(plan) -> bool:
    return any(d.removed or d.pending_cleared or d.dead_letters_removed or d.scheduled_removed
               for d in plan)


def _scheduled_part(drained) -> str:
    """', N scheduled messages' when scheduled messages are drained, else ''."""
    scheduled = sum(d.scheduled_removed or 0 for d in drained)
    return ', %s' % count(scheduled, 'scheduled message') if scheduled else ''


def _echo_drained(obj, drained, verb):
    for d in drained:
        line = '%s queue %r (%s%s): %s, %s' % (
            verb, d.queue, d.kind or 'not in registry',
            ', %d priority streams' % len(d.streams) if len(d.streams) > 1 else '',
            count(d.removed, 'message'), count(d.pending_cleared, 'pending entry', 'pending entries'))
        if d.dead_letters_removed is not None:
            line += ', %s' % count(d.dead_letters_removed, 'dead letter')
        if d.scheduled_removed:
            line += ', %s' % count(d.scheduled_removed, 'scheduled message')
        line += '; groups kept: %s' % (', '.join(d.groups_kept) or 'none')
        obj.echo(line)
    obj.echo('Total: %s%s and %s from %s.' % (
        count(sum(d.removed for d in drained), 'message'), _scheduled_part(drained),
        count(sum(d.pending_cleared for d in drained), 'pending entry', 'pending entries'),
        count(len(drained), 'queue')))


# -- nuke ---------------------------------------------------------------------

NUKED = 'entries removed or acked before the groups and keys go'

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
    obj = obj_of(ctx)
    target = Target(ctx, prefix)
    namespace = Keys(target.prefix).prefix

    def apply(plan):
        with interruptible(plan.messages + plan.pending, 'Nuking', NUKED) as progress:
            return admin.apply_nuke(target.client, plan, global_keyprefix=target.prefix,
                                    progress=progress)

    plan, done = plan_confirm_apply(
        obj, target, dry_run=dry_run, force=force, action='nuke',
        plan=lambda: admin.nuke(target.client, global_keyprefix=target.prefix,
                                keep_dead_letters=keep_dead_letters, dry_run=True),
        what=lambda plan: 'This will destroy %s and delete %s under %r.' % (
            count(len(plan.groups), 'consumer group'), count(len(plan.deleted_keys), 'key'),
            namespace) if plan.deleted_keys else None,
        apply=apply)
    obj.echo(target.describe())
    if not plan.deleted_keys:
        obj.echo('No keys under %r: nothing to nuke.' % namespace)
        echo_notes(target.client, target.prefix)   # kombu's lists, other dbs or prefixes
    elif dry_run:
        _echo_nuked(obj, plan, 'Would destroy')
        obj.echo(DRY_RUN_NOTE)
    else:
        _echo_nuked(obj, done, 'Destroyed')
        obj.echo('Note: workers still running re-create the groups of the queues they consume.')


def _echo_nuked(obj, result, verb):
    obj.echo('%s %s, %s and %s%s.' % (
        verb, count(len(result.groups), 'consumer group'), count(len(result.streams), 'stream'),
        count(len(result.other_keys), 'other key'),
        ' (schedules holding %s)' % count(result.scheduled, 'message') if result.scheduled else ''))
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
@queues_option('Status Options', 'every queue found')
@click.option('-v', '--verbose', cls=CeleryOption, is_flag=True, help_group='Status Options',
              help='Every queue (internal and broadcast ones too), with kind, length, each '
                   'consumer group and consumer.')
@click.option('--json', 'as_json', cls=CeleryOption, is_flag=True, help_group='Status Options',
              help='Print one JSON document, every queue in full (shape: see docs/cli.md).')
@click.option('--watch', cls=CeleryOption, is_flag=True, help_group='Status Options',
              help='Refresh every --interval seconds, with messages in and out per second '
                   '(Redis 7.0+); Ctrl-C stops.')
@click.option('--interval', cls=CeleryOption, type=click.FloatRange(min=0.2), default=2.0,
              show_default=True, help_group='Status Options', help='Seconds between two refreshes.')
@click.option('--count', 'rounds', cls=CeleryOption, type=click.IntRange(min=1), default=None,
              help_group='Status Options', help='With --watch: stop after this many refreshes.')
@prefix_option
@click.pass_context
def status(ctx, queues, verbose, as_json, watch, interval, rounds, prefix, **kwargs):
    """Show one line per task queue: messages ready and unacked, consumers, the oldest unacked,
    scheduled messages and dead letters (-v: every queue, group and consumer)."""
    obj = obj_of(ctx)
    target = Target(ctx, prefix)
    verbose = verbose or bool(queues)   # queues named: shown whatever they are

    def collect():
        with target.errors():
            found = admin.status(target.client, global_keyprefix=target.prefix,
                                 consumer_group=target.group, queues=queues)
        return dict(broker=target.url, **found.as_dict())

    if watch:
        _watch(obj, collect, interval, rounds, verbose)
    elif as_json:
        obj.echo(json.dumps(collect(), indent=2))
    else:
        for line in _status_lines(obj, collect(), verbose=verbose, groups=verbose):
            obj.echo(line)
    if not (watch or as_json):
        echo_notes(target.client, target.prefix)   # kombu's lists, other dbs or prefixes


def _watch(obj, collect, interval, rounds, verbose=False):
    """Redraw the table in place (cursor home, overwrite, clear the rest: no flicker) on a
    terminal; elsewhere print one table per refresh."""
    tty = text_stream('stdout').isatty()
    before, taken = None, 0
    try:
        while rounds is None or taken < rounds:
            started = monotonic()
            doc = collect()
            rates = _rates(before, doc)
            before = (started, doc)
            lines = _status_lines(obj, doc, rates=rates, verbose=verbose)
            lines.append('every %.1fs, %s; Ctrl-C stops' % (interval, strftime('%H:%M:%S')))
            if tty:
                click.echo('\x1b[H' + ''.join(line + '\x1b[K\n' for line in lines) + '\x1b[J', nl=False)
            else:
                click.echo('\n'.join(lines) + '\n')
            taken += 1
            if rounds is None or taken < rounds:
                sleep(max(interval - (monotonic() - started), 0))
    except KeyboardInterrupt:
        pass


def _rates(before, doc):
    """queue -> (in/s, out/s) since the last refresh; None where the server keeps no count."""
    if before is None:
        return {}
    then, old = before
    elapsed = max(monotonic() - then, 1e-3)
    previous = {q['name']: q for q in old['queues']}
    rates = {}
    for q in doc['queues']:
        p = previous.get(q['name'])
        if p is None or q['entries_added'] is None or p['entries_added'] is None:
            continue
        came = max(q['entries_added'] - p['entries_added'], 0)
        gone = max(came - (q['length'] - p['length']), 0)   # entries leave the stream when acked
        rates[q['name']] = (came / elapsed, gone / elapsed)
    return rates


def _shown(queue, verbose) -> bool:
    """Whether the table has a line for ``queue``: task queues, or every queue with -v."""
    return verbose or not (queue['internal'] or queue['kind'] == FANOUT)


def _status_lines(obj, doc, rates=None, verbose=False, groups=False):
    """The header, one row per queue shown (and, with ``groups``, its groups and consumers),
    then what is hidden and the stale consumers."""
    server = doc['server']
    lines = ['%s, %s %s, keys under %r, group %r' % (
        doc['broker'], server['flavor'], server['version'], doc['namespace'], doc['consumer_group'])]
    shown = [q for q in doc['queues'] if _shown(q, verbose)]
    head = ('QUEUE',) + (('KIND',) if verbose else ()) + ('READY', 'UNACKED', 'CONSUMERS') + (
        ('LENGTH',) if verbose else ()) + ('OLDEST', 'SCHED', 'DEAD') + (
        ('IN/S', 'OUT/S') if rates is not None else ())
    rows = [head] + [_row(q, verbose, rates) for q in shown]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    left = 2 if verbose else 1   # name (and kind) flush left, numbers right
    for n, row in enumerate(rows if shown else ()):
        line = '  '.join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths)))
        lines.append(obj.style(line, bold=True) if n == 0 else line)
        if n and groups:
            lines += _group_lines(shown[n - 1])
    return lines + _footer(doc['queues'], shown) + _limit_lines(doc.get('rate_limits') or [])


def _limit_lines(shown) -> list:
    """The global rate limits and what each holds back (celery streams limit list)."""
    if not shown:
        return []
    return ['Rate limits (held: messages waiting in schedules for their turn):',
            *('  ' + line for line in format_table(shown).splitlines())]


def _row(q, verbose, rates) -> tuple:
    kind = 'internal' if q['internal'] else q['kind'] or '?'
    row = ((q['name'],) + ((kind,) if verbose else ())
           + (cell(q['waiting']), cell(q['pending']), cell(q['consumers']))
           + ((cell(q['length']),) if verbose else ())
           + (age(q['oldest_pending_age']), cell(q['scheduled']), cell(q['dead_letters'])))
    if rates is not None:
        speed = rates.get(q['name'])
        row += ('%.1f' % speed[0], '%.1f' % speed[1]) if speed else ('-', '-')
    return row


def _footer(queues, shown) -> list:
    """What the table left out, and the stale consumers (dead workers still in a group)."""
    lines = [] if shown else ['No task queues.' if queues else 'No queues.']
    hidden = len(queues) - len(shown)
    if hidden:
        lines.append('(%s hidden: internal and broadcast; -v shows them)' % count(hidden, 'queue'))
    stale = [(q['name'], c) for q in shown for c in q['stale_consumers']]
    if stale:
        lines.append('%s, liveness key expired (worker gone; a live consumer of the queue takes '
                     'over its messages): %s' % (count(len(stale), 'stale consumer'), ', '.join(
                         '%s on %s' % (c, queue) for queue, c in stale)))
    return lines


def _group_lines(queue):
    lines = [] if queue['exists'] else ['    (no stream)']
    if queue['scheduled']:
        lines.append('    scheduled %s, the next due in %s' % (
            queue['scheduled'], seconds(queue['next_due_in'])))
    for shard in queue.get('shards') or ():   # a sharded queue: its counts by shard
        lines.append('    shard %s: ready %s, unacked %s, scheduled %s, dead letters %s'
                     % (shard['name'], cell(shard['waiting']), shard['pending'], shard['scheduled'],
                        shard['dead_letters']))
    for g in queue['groups']:
        lines.append('    group %s%s: %s, pending %s, last delivered %s, entries read %s, lag %s, oldest %s'
                     % (g['name'], ' (priority bucket %s)' % g['bucket'] if g['bucket'] else '',
                        count(len(g['consumers']), 'consumer'), g['pending'], g['last_delivered_id'],
                        cell(g['entries_read']), cell(g['lag']), seconds(g['oldest_pending_age'])))
        for c in g['consumers']:
            alive = {True: ', alive', None: '',
                     False: ', STALE: no liveness key (a dead worker)'}[c['alive']]
            lines.append('      consumer %s: pending %s, idle %s ms%s'
                         % (c['name'], c['pending'], c['idle_ms'], alive))
    return lines
