"""Lua scripts, one file per atomic operation, each with a KEYS/ARGV/returns header.

They are registered once per client pool; redis-py's ``Script`` re-loads a
script by itself after ``SCRIPT FLUSH`` or a server restart (``NOSCRIPT``).
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

NAMES = ('restore', 'drain', 'append', 'reclaim', 'read', 'forget_consumer', 'route', 'requeue_dead',
         'prune_registry')


@lru_cache(maxsize=None)
def source(name: str) -> str:
    return resources.files(__name__).joinpath(name + '.lua').read_text()


class Scripts:
    """The scripts registered on one client: ``scripts.restore(keys=..., args=...)``."""

    def __init__(self, client):
        for name in NAMES:
            setattr(self, name, client.register_script(source(name)))
