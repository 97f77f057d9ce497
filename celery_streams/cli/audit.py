"""``celery streams audit``: the ledger of each queue, balanced (:mod:`celery_streams.ledger`)."""
from __future__ import annotations

import json

import click
from celery.bin.base import CeleryCommand, CeleryOption

from .. import ledger
from .base import Target, obj_of, prefix_option, queues_option, streams

#: The columns of the table: header, then what fills it.
COLUMNS = (('QUEUE', lambda q: q.queue), ('PUBLISHED', lambda q: q.count('published')),
           ('ACKED', lambda q: q.count('acked')), ('REJECTED', lambda q: q.count('rejected')),
           ('DEAD', lambda q: q.count('dead_lettered')), ('EXPIRED', lambda q: q.count('expired')),
           ('DRAINED', lambda q: q.count('drained')), ('DROPPED', lambda q: q.count('dropped')),
           ('WAITING', lambda q: q.waiting), ('PENDING', lambda q: q.pending),
           ('SCHED', lambda q: q.scheduled),
           ('UNACCOUNTED', lambda q: '-' if q.unaccounted is None else q.unaccounted))


@streams.command(cls=CeleryCommand)
@queues_option('Audit Options', 'every queue')
@click.option('--json', 'as_json', cls=CeleryOption, is_flag=True, help_group='Audit Options',
              help='Print one JSON document (shape: see docs/cli.md).')
@click.option('-v', '--verbose', cls=CeleryOption, is_flag=True, help_group='Audit Options',
              help='Also show the flow counters: delivered, redelivered, requeued, restored...')
@click.option('--check', cls=CeleryOption, is_flag=True, help_group='Audit Options',
              help='Exit with status 1 when a queue does not balance.')
@prefix_option
@click.pass_context
def audit(ctx, queues, as_json, verbose, check, prefix, **kwargs):
    """Show, per queue, that nothing was lost: every message published is acked, rejected,
    dead-lettered, expired, drained or dropped, or still waiting, pending or scheduled.

    The counters are kept in Redis by the scripts that do the work; a difference
    is a message the transport did not move (see docs/metrics.md, "The ledger").
    """
    obj = obj_of(ctx)
    target = Target(ctx, prefix)
    with target.errors():
        found = ledger.audit(target.client, global_keyprefix=target.prefix, queues=queues or None,
                             consumer_group=target.group)
    if as_json:
        obj.echo(json.dumps({'broker': target.url, 'global_keyprefix': target.prefix or '',
                             'queues': [q.as_dict() for q in found]}, indent=2))
    else:
        obj.echo(target.describe())
        for line in audit_lines(found, verbose):
            obj.echo(line)
    if check and any(q.unaccounted for q in found):
        ctx.exit(1)


def audit_lines(found, verbose: bool = False) -> list[str]:
    """The table of ``found`` (:class:`ledger.QueueAudit`), then a note per unbalanced queue."""
    if not found:
        return ['No queues.']
    rows = [tuple(header for header, _ in COLUMNS)]
    rows += [tuple(str(value(q)) for _, value in COLUMNS) for q in found]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ['  '.join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    for q in found:
        if verbose:
            lines.append('%s: %s; %d dead letters now' % (q.queue, ', '.join(
                '%s %d' % (name, q.count(name)) for name in ledger.COUNTERS), q.dead_letters))
        if q.unaccounted:
            lines += difference_lines(q)
    if any(q.unaccounted is None for q in found):
        lines.append('-: a broadcast queue keeps read entries until MAXLEN trims them: not balanced.')
    if not any(q.unaccounted for q in found):
        lines.append('Balanced: every message published is accounted for.')
    return lines


def difference_lines(q) -> list[str]:
    """What one unbalanced queue's difference is, and what could explain it."""
    n = q.unaccounted
    if n > 0:
        head = 'Queue %r: %d message(s) published are neither counted out nor found' % (q.queue, n)
    else:
        head = 'Queue %r: %d message(s) found or counted out were never counted published' % (
            q.queue, -n)
    return [head + ' (published %d, accounted %d). It could be:' % (
        q.count('published'), q.accounted)] + ['  - ' + why for why in q.explanations]
