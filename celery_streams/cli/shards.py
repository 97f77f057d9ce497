"""``celery streams shards``: sharded queues, listed and set live.

::

    celery -A proj streams shards list [--json]
    celery -A proj streams shards set celery 3

``set`` publishes the queue on N shards from now on: the shards missing are
placed (on a Redis Cluster, each on a master no other shard of the queue
uses), the ones beyond N are kept for the consumers, which read every shard
ever placed (lowering N loses nothing). Publishers and workers learn of it
within about a second (:data:`celery_streams.shards.REFRESH`); a worker reads
a new shard without a restart. The work is done by :mod:`celery_streams.shards`.
"""
from __future__ import annotations

import json

import click
from celery.bin.base import CeleryCommand, CeleryOption

from .. import shards
from ..errors import ConfigurationError
from ..keys import Keys
from .base import Target, obj_of, prefix_option, streams


@streams.group('shards', cls=click.Group)
def shards_group():
    """Sharded queues: one queue spread over several masters (see docs/shards.md)."""


@shards_group.command('list', cls=CeleryCommand)
@click.option('--json', 'as_json', cls=CeleryOption, is_flag=True, help_group='Shard Options',
              help='Print one JSON document: a list of {queue, count, shards: [{name, master}]}.')
@prefix_option
@click.pass_context
def list_shards(ctx, as_json, prefix, **kwargs):
    """Show every sharded queue: how many shards publishers use, and every shard placed."""
    obj = obj_of(ctx)
    target = Target(ctx, prefix)
    with target.errors():
        shown = described(target.client, Keys(target.prefix))
    if as_json:
        obj.echo(json.dumps(shown, indent=2))
        return
    obj.echo(target.describe())
    if not shown:
        obj.echo('No sharded queues.')
        return
    obj.echo(format_table(shown))


def described(client, keys: Keys) -> list[dict]:
    """Each sharded queue as ``shards list --json`` prints it."""
    found = []
    for queue, placement in sorted(shards.read(client, keys).items()):
        masters = shards.masters(client, keys, placement.names)
        found.append({'queue': queue, 'count': placement.number,
                      'shards': [{'name': name, 'master': master, 'publishing': n < placement.number}
                                 for n, (name, master) in enumerate(zip(placement.names, masters))]})
    return found


def format_table(shown: list[dict]) -> str:
    rows = [('QUEUE', 'COUNT', 'SHARDS')]
    rows += [(s['queue'], str(s['count']),
              ', '.join(sh['name'] + ('' if sh['publishing'] else ' (draining)')
                        + (' @' + sh['master'] if sh['master'] else '') for sh in s['shards']))
             for s in shown]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return '\n'.join('  '.join([row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2]]).rstrip()
                     for row in rows)


@shards_group.command('set', cls=CeleryCommand)
@click.argument('queue')
@click.argument('count', type=int)
@prefix_option
@click.pass_context
def set_shards(ctx, queue, count, prefix, **kwargs):
    """Publish QUEUE on COUNT shards (1: unsharded again; its shards drain)."""
    obj = obj_of(ctx)
    target = Target(ctx, prefix)
    try:
        shards.check_count(queue, count)
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from None
    with target.errors():
        keys = Keys(target.prefix)
        before = shards.read(target.client, keys).get(queue)
        placement = shards.set_count(target.client, keys, queue, count)
    if before is not None and before.number == count:
        obj.echo('Queue %r is already published on %d shard(s).' % (queue, count))
        return
    obj.echo('Queue %r is published on %d shard(s): %s; consumers read %d.'
             % (queue, count, ', '.join(placement.publishing), len(placement.names)))
