"""Lua scripts, one file per atomic operation, each with a KEYS/ARGV/returns header.

What several scripts do alike is written once, in ``_library.lua`` (appending
a message to a queue stream, the member of a schedule): :func:`source` puts it
in front of every script, so a script's SHA covers the library too.

:class:`Scripts` registers them once per client; the transport and the
operator commands use the same object. There are three ways to run one, and
each handles ``NOSCRIPT`` (a server restart or ``SCRIPT FLUSH``) by itself:

* ``scripts.drain(keys=..., args=..., client=pipe)`` -- redis-py's ``Script``:
  on a client it re-loads and retries; in a pipeline, the pipeline loads
  every script it carries before it runs;
* :meth:`Scripts.run` -- the hot path (publishes): commands packed by hand
  and sent in one write (:mod:`celery_streams.wire`); the ones refused with
  ``NOSCRIPT`` are sent again once the scripts are loaded;
* :meth:`Scripts.command` + :meth:`Scripts.reload` -- a read sent now and
  answered later (the consume loop): the caller reloads and sends again.

:meth:`Scripts.drain_stream` runs the ``drain`` script in bounded steps (at
most :data:`DRAIN_STEP` entries of work per call) until the stream is drained.
"""
from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

from redis.commands.core import Script
from redis.exceptions import NoScriptError

from .. import wire
from ..keys import is_dead_letters, ledger_of

NAMES = ('restore', 'drain', 'append', 'reclaim', 'read', 'forget_consumer', 'route', 'requeue_dead',
         'prune_registry', 'create_group', 'schedule', 'promote', 'drain_scheduled', 'ack',
         'reserve', 'hold', 'unhold',
         'unique', 'unique_hold')   # uniqueness keys (celery_streams.unique)

#: The most entries one ``drain`` call acks and trims in all, in :meth:`Scripts.drain_stream`.
#: An ack (XPENDING + XACK) costs about 1 µs of server time, trimming 0.05 µs an entry
#: (0.3 µs with one entry per stream node, as payloads over 4 KB get): a call takes about
#: 1 ms, and no other client waits longer than that for one step.
DRAIN_STEP = 1000


#: The file of the functions every script may call (``append``, ``schedule_member``...).
LIBRARY = '_library'


@lru_cache(maxsize=None)
def source(name: str) -> str:
    """The text of script ``name`` as it is loaded: the library, then the script's file, when
    the script calls a function of the library (the others, such as the ``read`` run on
    every read, do not pay for defining them)."""
    text = _read(name)
    if any(re.search(r'\b%s\(' % function, text) for function in library_functions()):
        return _read(LIBRARY) + text
    return text


@lru_cache(maxsize=None)
def library_functions() -> tuple:
    """The names of the functions ``_library.lua`` defines."""
    return tuple(re.findall(r'^local function (\w+)\(', _read(LIBRARY), re.MULTILINE))


def _read(name: str) -> str:
    return resources.files(__name__).joinpath(name + '.lua').read_text()


class Scripts:
    """The scripts registered on one client: ``scripts.restore(keys=..., args=...)``."""

    # One attribute per name of NAMES, set in __init__ (declared here for type checkers).
    restore: Script
    drain: Script
    append: Script
    reclaim: Script
    read: Script
    forget_consumer: Script
    route: Script
    requeue_dead: Script
    prune_registry: Script
    create_group: Script
    schedule: Script
    promote: Script
    drain_scheduled: Script
    ack: Script
    reserve: Script
    hold: Script
    unhold: Script
    unique: Script
    unique_hold: Script

    def __init__(self, client):
        self.client = client
        for name in NAMES:
            setattr(self, name, client.register_script(source(name)))

    def command(self, name: str, keys, args) -> list:
        """The ``EVALSHA`` command that runs script ``name``, to send as it is."""
        return ['EVALSHA', getattr(self, name).sha, len(keys), *keys, *args]

    def reload(self, name: str) -> None:
        """Load script ``name`` again (after ``NOSCRIPT``)."""
        self.client.script_load(source(name))

    def reload_all(self) -> None:
        """Load every script again (after ``NOSCRIPT``: the server lost them all)."""
        for name in NAMES:
            self.reload(name)

    def run(self, pool, commands) -> list:
        """Send ``commands`` (scripts from :meth:`command`, or any) in one write; their replies.

        Errors are returned as exceptions. Commands refused with ``NOSCRIPT``
        did not run: the scripts are loaded and those are sent again (with the
        closing ``WAIT``, if any, so that it still covers them).
        """
        replies = wire.calls(pool, commands)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            self.reload_all()
            if commands[-1][0] == 'WAIT' and missing[-1] != len(commands) - 1:
                missing.append(len(commands) - 1)
            for i, reply in zip(missing, wire.calls(pool, [commands[i] for i in missing])):
                replies[i] = reply
        return replies

    def drain_stream(self, stream, until: str, *, delete_empty: bool = False,
                     step: int = DRAIN_STEP, progress=None,
                     unique_prefix: str | None = None) -> tuple[int, int]:
        """Drain ``stream`` up to entry ``until`` (inclusive) in bounded steps.

        Calls the ``drain`` script with ``step`` until nothing up to ``until``
        is left in the stream or pending in any group: each call acks and trims
        at most ``step`` entries in all, so Redis serves other clients between
        calls. ``until`` should be an id: with ``'+'`` the end moves while
        entries are added. ``delete_empty``: delete the key once it is empty
        and groupless (a dead-letter stream). ``progress(n)`` is called after
        each call that removed or cleared ``n`` entries. What it removes counts in the
        ledger of the stream's queue: ``drained``, or ``dead_purged`` (a dead-letter stream).
        ``unique_prefix`` (``Keys.unique_prefix`` of the stream's queue): the messages
        removed release the uniqueness keys they hold (:mod:`celery_streams.unique`).
        Returns ``(entries removed, pending entries cleared)``.
        """
        removed = cleared = 0
        while True:
            step_removed, step_cleared, more = self.drain(
                keys=[stream, ledger_of(stream)],
                args=[until, '1' if delete_empty else '0', step,
                      'dead_purged' if is_dead_letters(stream) else 'drained',
                      *([unique_prefix] if unique_prefix else [])])
            removed += step_removed
            cleared += step_cleared
            if progress is not None and (step_removed or step_cleared):
                progress(step_removed + step_cleared)
            if not more:
                return removed, cleared
            if not (step_removed or step_cleared):   # every call acks or trims: never spin
                raise RuntimeError('drain of %r up to %s made no progress' % (stream, until))
