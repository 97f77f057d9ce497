"""Lua scripts, one file per atomic operation, each with a KEYS/ARGV/returns header.

:class:`Scripts` registers them once per client; the transport and the
operator commands use the same object. There are three ways to run one, and
each handles ``NOSCRIPT`` (a server restart or ``SCRIPT FLUSH``) by itself:

* ``scripts.drain(keys=..., args=..., client=pipe)`` -- redis-py's ``Script``:
  on a client it re-loads and retries; in a pipeline, the pipeline loads
  every script it carries before it runs;
* :meth:`Scripts.call` -- the hot path: packed by hand on a pooled connection
  (:mod:`celery_streams.wire`), re-loaded and retried once on ``NOSCRIPT``;
* :meth:`Scripts.command` + :meth:`Scripts.reload` -- a read sent now and
  answered later (the consume loop): the caller reloads and sends again.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

from redis.exceptions import NoScriptError

from .. import wire

NAMES = ('restore', 'drain', 'append', 'reclaim', 'read', 'forget_consumer', 'route', 'requeue_dead',
         'prune_registry', 'create_group')


@lru_cache(maxsize=None)
def source(name: str) -> str:
    return resources.files(__name__).joinpath(name + '.lua').read_text()


class Scripts:
    """The scripts registered on one client: ``scripts.restore(keys=..., args=...)``."""

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

    def call(self, pool, name: str, keys, args):
        """Run script ``name`` on a connection of ``pool``, packed by hand; its reply."""
        command = self.command(name, keys, args)
        try:
            return wire.call(pool, *command)
        except NoScriptError:
            self.reload(name)
            return wire.call(pool, *command)
