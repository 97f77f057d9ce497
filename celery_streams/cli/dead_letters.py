"""``celery streams dead-letters list | show | requeue | purge``."""
from __future__ import annotations

import json

import click
from celery.bin.base import CeleryCommand, CeleryOption

from .. import admin
from ..deadletter_detail import SHOW_LIMIT
from ..keys import Keys
from .base import (AGAIN, DRY_RUN_NOTE, Target, age, cell, count, dry_run_option, force_option,
                   interruptible, listing_json, obj_of, plan_confirm_apply, prefix_option,
                   queues_option, streams)

DEAD_LETTER_LIMIT = 100
UNDECODABLE_NOTE = 'undecodable payload: a worker will dead-letter it again'


@streams.group(name='dead-letters')
@click.pass_context
def dead_letters(ctx, **kwargs):
    """List, show, requeue or purge the dead letters of queues."""
    obj_of(ctx)


@dead_letters.command(name='list', cls=CeleryCommand)
@queues_option('List Options', 'every queue with dead letters')
@click.option('--json', 'as_json', cls=CeleryOption, is_flag=True, help_group='List Options',
              help='Print one JSON document (shape: see docs/cli.md).')
@click.option('--limit', cls=CeleryOption, type=click.IntRange(min=0), default=DEAD_LETTER_LIMIT,
              show_default=True, help_group='List Options',
              help='Show at most this many dead letters per queue, the oldest first; 0: all.')
@prefix_option
@click.pass_context
def list_dead_letters(ctx, queues, as_json, limit, prefix, **kwargs):
    """Show each dead letter: id, age, reason, source, task and its arguments, payload size."""
    obj = obj_of(ctx)
    target = Target(ctx, prefix)
    with target.errors():
        found = admin.dead_letters(target.client, global_keyprefix=target.prefix, queues=queues,
                                   limit=limit)
    if as_json:
        obj.echo(listing_json(target, limit, found))
        return
    obj.echo(target.describe())
    if not found:
        obj.echo('No dead letters.')
        return
    keys = Keys(target.prefix)
    for q in found:
        obj.echo(obj.style('Queue %r: %s (%s)' % (q.queue, count(q.count, 'dead letter'), q.stream),
                           bold=True))
        if not q.dead_letters:
            continue
        rows = [('ID', 'AGE', 'SOURCE ID', 'TASK', 'TASK ID', 'ARGS', 'SIZE', 'REASON')]
        for d in q.dead_letters:
            rows.append((d.ref, age(d.age), _source(d, keys), d.task or '-', d.task_id or '-',
                         _arguments(d), cell(d.payload_size), cell(d.reason)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            obj.echo('  ' + '  '.join(cell.rjust(w) if i in (1, 6) else cell.ljust(w)
                                      for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
        if q.truncated:
            obj.echo('  ... %s more (--limit 0 shows all)' % (q.count - len(q.dead_letters)))


#: Characters of a task's arguments `list` shows; `show` prints them all.
ARGS_WIDTH = 40


def _arguments(d) -> str:
    if d.args is None and d.kwargs is None:
        return '-'
    text = ', '.join(part for part in (d.args, d.kwargs) if part not in (None, '', '()', '{}')) or '()'
    return text if len(text) <= ARGS_WIDTH else text[:ARGS_WIDTH - 3] + '...'


@dead_letters.command(cls=CeleryCommand)
@click.argument('dead_letter_id', metavar='[QUEUE/]ID')
@queues_option('Show Options', 'every queue with dead letters')
@click.option('--json', 'as_json', cls=CeleryOption, is_flag=True, help_group='Show Options',
              help='Print one JSON document (shape: see docs/cli.md).')
@click.option('--full', cls=CeleryOption, is_flag=True, help_group='Show Options',
              help='Show every value whole: no value cut to %d KiB, a body of any size decoded.'
                   % (SHOW_LIMIT // 1024))
@click.option('--raw', cls=CeleryOption, is_flag=True, help_group='Show Options',
              help="Write the original payload's bytes, as stored, to stdout, and nothing else.")
@prefix_option
@click.pass_context
def show(ctx, dead_letter_id, queues, as_json, full, raw, prefix, **kwargs):
    """Show one dead letter in full: why, where from, the task, its arguments, the message.

    Name it as `dead-letters list` does, QUEUE/ID (an id alone is enough when no other
    queue has a dead letter of that id). Values over 64 KiB are cut, saying so.
    """
    obj = obj_of(ctx)
    target = Target(ctx, prefix)
    if raw and (as_json or full):
        raise click.ClickException('--raw writes the payload alone: leave out --json and --full')
    with target.errors():
        if raw:
            data = admin.raw_field(target.client, global_keyprefix=target.prefix,
                                   id=dead_letter_id, queues=queues)
            click.get_binary_stream('stdout').write(data)
            return
        detail = admin.show_dead_letter(target.client, global_keyprefix=target.prefix,
                                        id=dead_letter_id, queues=queues, full=full)
    if as_json:
        obj.echo(json.dumps(dict(broker=target.url, **detail.as_dict()), indent=2, default=str))
        if detail.cut:   # on stderr: stdout stays one JSON document
            click.echo('Note: %s cut (listed in "cut"); --full shows all, --raw writes the payload\'s '
                       'bytes.' % count(len(detail.cut), 'value'), err=True)
        return
    lines = _show_lines(detail)
    width = max(len(name) for name, _ in lines)
    obj.echo(target.describe())
    for name, value in lines:
        obj.echo('%s  %s' % (name.rjust(width), value))


#: Bytes of an undecodable payload `show` prints (escaped).
PREVIEW = 200


def _show_lines(detail) -> list[tuple[str, str]]:
    d = detail.dead_letter
    lines = [('queue', d.queue), ('id', d.id), ('age', age(d.age)), ('reason', cell(d.reason)),
             ('source', '%s %s' % (d.source_stream or '-', d.source_id or '-')),
             ('deliveries', cell(d.deliveries))]
    if d.task:
        lines += [('task', '%s[%s]' % (d.task, d.task_id or '?')),
                  ('args', json.dumps(detail.args, default=str) if detail.args is not None else cell(d.args)),
                  ('kwargs', json.dumps(detail.kwargs, default=str) if detail.kwargs is not None
                   else cell(d.kwargs))]
    if detail.headers:
        lines += [('headers', json.dumps(detail.headers, default=str, sort_keys=True))]
    if detail.properties:
        lines += [('properties', json.dumps(detail.properties, default=str, sort_keys=True))]
    if not d.decodable:
        lines += [('payload', _undecodable(detail))]
    elif not d.task:
        lines += [('content type', cell(detail.content_type)),
                  ('body', json.dumps(detail.body, default=str) if detail.body is not None else '-')]
    lines += [('fields', ', '.join(d.fields))]
    cut = [c for c in detail.cut if not c.what.startswith('record ')]   # the record is not printed
    if cut:
        lines += [('cut', '; '.join('%s: %s, %s' % (c.what, count(c.size, 'character'),
                                                   '%d shown' % c.shown if c.shown else 'not decoded')
                                    for c in cut) + ' (--full shows all, --raw writes the payload)')]
    return lines


def _undecodable(detail) -> str:
    """The payload escaped, its first PREVIEW bytes, and what happens to it."""
    if detail.head is None:
        return 'none (%s)' % UNDECODABLE_NOTE
    size = detail.dead_letter.payload_size
    shown = repr(detail.head[:PREVIEW])
    return '%s%s, %s: %s (--raw writes its bytes)' % (
        shown, '...' if size > PREVIEW else '', count(size, 'byte'), UNDECODABLE_NOTE)


@dead_letters.command(cls=CeleryCommand)
@queues_option('Requeue Options', 'every queue with dead letters')
@click.option('--id', 'ids', cls=CeleryOption, multiple=True, help_group='Requeue Options',
              help='Requeue only this dead letter: QUEUE/ID, as `dead-letters list` shows it (an id '
                   'alone when no other queue has a dead letter of that id); repeatable, or comma '
                   'separated.')
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
    obj = obj_of(ctx)
    target = Target(ctx, prefix)
    ids = [i for value in ids for i in value.split(',') if i.strip()]

    def what(plan):
        movable = [item for item in plan if item.outcome != 'empty']
        if not movable:
            return None
        names = list(dict.fromkeys(item.dead_letter.queue for item in movable))
        return 'This will move %s of %s (%s) back to their queues, delivery counts reset.' % (
            count(len(movable), 'dead letter'), count(len(names), 'queue'), ', '.join(names))

    def apply(plan):
        movable = sum(item.outcome != 'empty' for item in plan)
        again = AGAIN if not ids else 'The others are still dead letters: requeue them by id again.'
        with interruptible(movable, 'Requeuing', 'dead letters requeued', again) as progress:
            return admin.apply_requeue(target.client, plan, global_keyprefix=target.prefix,
                                       progress=progress)

    plan, _ = plan_confirm_apply(
        obj, target, dry_run=dry_run, force=force, action='requeue', what=what,
        plan=lambda: admin.requeue_dead_letters(target.client, global_keyprefix=target.prefix,
                                                queues=queues, ids=ids, dry_run=True),
        apply=apply)
    obj.echo(target.describe())
    if not plan:
        obj.echo('No dead letters: nothing to requeue.')
        return
    for item in plan:
        obj.echo(_requeue_line(item))
    requeued = [i for i in plan if i.outcome in ('requeued', 'would requeue')]
    obj.echo('Total: %s %s %s.' % (
        count(len(requeued), 'dead letter'), 'would be requeued' if dry_run else 'requeued',
        'from ' + count(len({i.dead_letter.queue for i in requeued}), 'queue')))
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
@queues_option('Purge Options', 'every queue with dead letters')
@force_option('Purge Options')
@dry_run_option('Purge Options', 'deleted')
@prefix_option
@click.pass_context
def purge(ctx, queues, force, dry_run, prefix, **kwargs):
    """Delete the dead letters of queues (their dead-letter streams)."""
    obj = obj_of(ctx)
    target = Target(ctx, prefix)

    def apply(plan):
        with interruptible(sum(p.removed for p in plan), 'Purging', 'dead letters deleted') as progress:
            return admin.apply_purge(target.client, plan, progress=progress)

    plan, done = plan_confirm_apply(
        obj, target, dry_run=dry_run, force=force, action='purge dead letters',
        plan=lambda: admin.purge_dead_letters(target.client, global_keyprefix=target.prefix,
                                              queues=queues, dry_run=True),
        what=lambda plan: 'This will delete %s of %s: %s.' % (
            count(sum(p.removed for p in plan), 'dead letter'),
            count(len(plan), 'queue'), ', '.join(p.queue for p in plan)),
        apply=apply)
    obj.echo(target.describe())
    if not plan:
        obj.echo('No dead letters: nothing to purge.')
        return
    result, verb = (plan, 'Would delete') if dry_run else (done, 'Deleted')
    for p in result:
        obj.echo('%s %s of queue %r (%s)' % (verb, count(p.removed, 'dead letter'), p.queue, p.stream))
    obj.echo('Total: %s from %s.' % (count(sum(p.removed for p in result), 'dead letter'),
                                     count(len(result), 'queue')))
    if dry_run:
        obj.echo(DRY_RUN_NOTE)


def _source(d, keys: Keys) -> str:
    if d.source_id is None:
        return '-'
    info = keys.parse(d.source_stream) if d.source_stream else None
    if info is not None and info.role == 'stream' and info.detail:
        return '%s (p%s)' % (d.source_id, info.detail)
    return d.source_id


