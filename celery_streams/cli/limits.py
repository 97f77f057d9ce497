"""``celery streams limit``: global rate limits, listed, set and cleared live.

::

    celery -A proj streams limit list [--json]
    celery -A proj streams limit set proj.tasks.charge 5/s [--burst N]
    celery -A proj streams limit set queue:emails 100/m
    celery -A proj streams limit clear proj.tasks.charge

A change holds at once for every worker (the ``reserve`` script reads the
rate on every call); a worker learns that a task or queue has become limited,
or is no longer, within a second (:data:`celery_streams.limits.REFRESH`).
Setting a different rate, or clearing, lets go of the messages the limit held
back: they are asked again, paced under the new rate or started at once.
The work is done by :mod:`celery_streams.limits`.
"""
from __future__ import annotations

import json

import click
from celery.bin.base import CeleryCommand, CeleryOption

from .. import limits, rates
from ..errors import ConfigurationError
from ..keys import Keys
from .base import Target, obj_of, prefix_option, streams


@streams.group(cls=click.Group)
def limit():
    """Global rate limits: across every worker, process and pool (see docs/rate-limits.md)."""


@limit.command('list', cls=CeleryCommand)
@click.option('--json', 'as_json', cls=CeleryOption, is_flag=True, help_group='Limit Options',
              help='Print one JSON document: a list of {limit, rate, burst, held, clear_in}.')
@prefix_option
@click.pass_context
def list_limits(ctx, as_json, prefix, **kwargs):
    """Show every limit, and what it holds back (messages waiting for their turn)."""
    obj = obj_of(ctx)
    target = Target(ctx, prefix)
    with target.errors():
        shown = _state(target)
    if as_json:
        obj.echo(json.dumps(shown, indent=2))
        return
    obj.echo(target.describe())
    if not shown:
        obj.echo('No rate limits.')
        return
    obj.echo(format_table(shown))


def format_table(shown: list[dict]) -> str:
    """The limits as ``status`` and ``limit list`` print them."""
    rows = [('LIMIT', 'RATE', 'BURST', 'HELD', 'CLEAR IN')]
    rows += [(s['limit'], s['rate'], str(s['burst']), str(s['held']), '%.1fs' % s['clear_in'])
             for s in shown]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return '\n'.join('  '.join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                     for row in rows)


@limit.command('set', cls=CeleryCommand)
@click.argument('name')
@click.argument('rate')
@click.option('--burst', cls=CeleryOption, type=click.IntRange(min=1), default=1, show_default=True,
              help_group='Limit Options', help='How many may start at once after a quiet spell.')
@prefix_option
@click.pass_context
def set_limit(ctx, name, rate, burst, prefix, **kwargs):
    """Limit task NAME (or queue:NAME) to RATE, in Celery's notation: 100/s, 10/m, 500/h."""
    obj = obj_of(ctx)
    target = Target(ctx, prefix)
    try:
        new = rates.limit(name, rate, burst)
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from None
    with target.errors():
        keys = Keys(target.prefix)
        before = limits.read(target.client, keys).get(new.field)
        changed = limits.write(target.client, keys, [new])
    if not changed:
        obj.echo('Rate limit %s is already %s (burst %d).' % (new.name, new.rate, new.burst))
    elif before is None:
        obj.echo('Rate limit %s set to %s (burst %d).' % (new.name, new.rate, new.burst))
    else:
        obj.echo('Rate limit %s changed from %s to %s (burst %d); what it held is paced anew.'
                 % (new.name, before.rate, new.rate, new.burst))


@limit.command('clear', cls=CeleryCommand)
@click.argument('name')
@prefix_option
@click.pass_context
def clear_limit(ctx, name, prefix, **kwargs):
    """Remove the limit of task NAME (or queue:NAME): what it held back runs at once."""
    obj = obj_of(ctx)
    target = Target(ctx, prefix)
    try:
        field = rates.field_of(name)
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from None
    with target.errors():
        released = limits.clear(target.client, Keys(target.prefix), field)
    if released is None:
        raise click.ClickException('no rate limit %s (see: celery streams limit list)' % name)
    obj.echo('Rate limit %s cleared; %d held message(s) let go.' % (name, released))


def _state(target: Target) -> list[dict]:
    keys = Keys(target.prefix)
    seconds, micros = target.client.time()
    return limits.state(target.client, keys, limits.read(target.client, keys).values(),
                        seconds * 1000 + micros / 1000)
