"""``celery streams drain | nuke | status``."""
from __future__ import annotations

import json

import click
from celery.bin.base import CeleryCommand, CeleryOption

from .. import admin
from ..keys import Keys
from .base import (DRY_RUN_NOTE, RESERVED_NOTE, Target, cell, count, dry_run_option, force_option,
                   obj_of, plan_confirm_apply, prefix_option, queues_option, seconds, streams)

# -- drain --------------------------------------------------------------------

@streams.command(cls=CeleryCommand)
@queues_option('Drain Options', 'every task queue in the registry')
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
    obj = obj_of(ctx)
    target = Target(ctx, prefix)
    plan, done = plan_confirm_apply(
        obj, target, dry_run=dry_run, force=force, action='drain',
        plan=lambda: admin.drain(target.client, global_keyprefix=target.prefix, queues=queues,
                                 include_broadcast=include_broadcast, dead_letters=dead_letters,
                                 dry_run=True),
        what=lambda plan: 'This will remove %s and %s from %s: %s.' % (
            count(sum(d.removed for d in plan), 'message'),
            count(sum(d.pending_cleared for d in plan), 'pending entry', 'pending entries'),
            count(len(plan), 'queue'), ', '.join(d.queue for d in plan)),
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
            count(d.removed, 'message'), count(d.pending_cleared, 'pending entry', 'pending entries'))
        if d.dead_letters_removed is not None:
            line += ', %s' % count(d.dead_letters_removed, 'dead letter')
        line += '; groups kept: %s' % (', '.join(d.groups_kept) or 'none')
        obj.echo(line)
    obj.echo('Total: %s and %s from %s.' % (
        count(sum(d.removed for d in drained), 'message'),
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
    plan, done = plan_confirm_apply(
        obj, target, dry_run=dry_run, force=force, action='nuke',
        plan=lambda: admin.nuke(target.client, global_keyprefix=target.prefix,
                                keep_dead_letters=keep_dead_letters, dry_run=True),
        what=lambda plan: 'This will destroy %s and delete %s under %r.' % (
            count(len(plan.groups), 'consumer group'), count(len(plan.deleted_keys), 'key'),
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
        verb, count(len(result.groups), 'consumer group'), count(len(result.streams), 'stream'),
        count(len(result.other_keys), 'other key')))
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
@prefix_option
@click.pass_context
def status(ctx, queues, as_json, prefix, **kwargs):
    """Show queues, consumer groups, consumers, pending entries and dead letters."""
    obj = obj_of(ctx)
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
        rows.append((q['name'], q['kind'] or '?', cell(q['waiting']), cell(q['length']),
                     cell(q['pending']), seconds(q['oldest_pending_age']), cell(q['dead_letters'])))
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
                    count(len(g['consumers']), 'consumer'), g['pending'], g['last_delivered_id'],
                    cell(g['entries_read']), cell(g['lag']), seconds(g['oldest_pending_age'])))
        for c in g['consumers']:
            alive = {True: ', alive', False: ', no liveness key', None: ''}[c['alive']]
            obj.echo('      consumer %s: pending %s, idle %s ms%s'
                     % (c['name'], c['pending'], c['idle_ms'], alive))


