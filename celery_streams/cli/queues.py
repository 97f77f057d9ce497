"""``celery streams drain | nuke | status``."""
from __future__ import annotations

import json
from time import monotonic, sleep, strftime

import click
from celery.bin.base import CeleryCommand, CeleryOption

from .. import admin
from ..keys import Keys
from .base import (DRY_RUN_NOTE, RESERVED_NOTE, Target, cell, count, dry_run_option, force_option,
                   obj_of, plan_confirm_apply, prefix_option, progress_bar, queues_option, seconds,
                   streams, text_stream)

# -- drain --------------------------------------------------------------------

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
        with progress_bar(total, 'Draining') as progress:
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
        with progress_bar(plan.messages + plan.pending, 'Nuking') as progress:
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
@click.option('--json', 'as_json', cls=CeleryOption, is_flag=True, help_group='Status Options',
              help='Print one JSON document (shape: see docs/cli.md).')
@click.option('--watch', cls=CeleryOption, is_flag=True, help_group='Status Options',
              help='Refresh every --interval seconds, with messages in and out per second '
                   '(Redis 7.0+); Ctrl-C stops.')
@click.option('--interval', cls=CeleryOption, type=click.FloatRange(min=0.2), default=2.0,
              show_default=True, help_group='Status Options', help='Seconds between two refreshes.')
@click.option('--count', 'rounds', cls=CeleryOption, type=click.IntRange(min=1), default=None,
              help_group='Status Options', help='With --watch: stop after this many refreshes.')
@prefix_option
@click.pass_context
def status(ctx, queues, as_json, watch, interval, rounds, prefix, **kwargs):
    """Show queues, consumer groups, consumers, pending entries, dead letters and scheduled
    messages."""
    obj = obj_of(ctx)
    target = Target(ctx, prefix)

    def collect():
        with target.errors():
            found = admin.status(target.client, global_keyprefix=target.prefix,
                                 consumer_group=target.group, queues=queues)
        return dict(broker=target.url, **found.as_dict())

    if watch:
        _watch(obj, collect, interval, rounds)
    elif as_json:
        obj.echo(json.dumps(collect(), indent=2))
    else:
        for line in _status_lines(obj, collect()):
            obj.echo(line)


def _watch(obj, collect, interval, rounds):
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
            lines = _status_lines(obj, doc, rates=rates, groups=False)
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


def _status_lines(obj, doc, rates=None, groups=True):
    server = doc['server']
    lines = ['%s, %s %s, keys under %r, group %r' % (
        doc['broker'], server['flavor'], server['version'], doc['namespace'], doc['consumer_group'])]
    if not doc['queues']:
        return lines + ['No queues.']
    rows = [('QUEUE', 'KIND', 'WAITING', 'LENGTH', 'PENDING', 'OLDEST', 'SCHED', 'DEAD')
            + (('IN/S', 'OUT/S') if rates is not None else ())]
    for q in doc['queues']:
        row = (q['name'], q['kind'] or '?', cell(q['waiting']), cell(q['length']),
               cell(q['pending']), seconds(q['oldest_pending_age']), cell(q['scheduled']),
               cell(q['dead_letters']))
        if rates is not None:
            speed = rates.get(q['name'])
            row += ('%.1f' % speed[0], '%.1f' % speed[1]) if speed else ('-', '-')
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        line = '  '.join(cell.ljust(w) if i < 2 else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(row, widths)))
        lines.append(obj.style(line, bold=True) if n == 0 else line)
        if n and groups:
            lines += _group_lines(doc['queues'][n - 1])
    return lines


def _group_lines(queue):
    lines = [] if queue['exists'] else ['    (no stream)']
    if queue['scheduled']:
        lines.append('    scheduled %s, the next due in %s' % (
            queue['scheduled'], seconds(queue['next_due_in'])))
    for g in queue['groups']:
        lines.append('    group %s%s: %s, pending %s, last delivered %s, entries read %s, lag %s, oldest %s'
                     % (g['name'], ' (priority bucket %s)' % g['bucket'] if g['bucket'] else '',
                        count(len(g['consumers']), 'consumer'), g['pending'], g['last_delivered_id'],
                        cell(g['entries_read']), cell(g['lag']), seconds(g['oldest_pending_age'])))
        for c in g['consumers']:
            alive = {True: ', alive', False: ', no liveness key', None: ''}[c['alive']]
            lines.append('      consumer %s: pending %s, idle %s ms%s'
                         % (c['name'], c['pending'], c['idle_ms'], alive))
    return lines


