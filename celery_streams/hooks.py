"""The one place the transport looks into Celery's worker, which it does not import.

Celery keeps a worker's shutdown flags in ``celery.worker.state``. A pool that
runs tasks inside the delivery (``-P solo``) would otherwise run a whole
prefetched batch after a warm shutdown was asked for. The module is read only
when a worker already imported it: plain kombu programs never load Celery.
"""
from __future__ import annotations

import sys


def worker_shutting_down() -> bool:
    """True once a Celery worker in this process began its shutdown."""
    state = sys.modules.get('celery.worker.state')
    if state is None:
        return False
    return any(flag not in (None, False) for flag in (state.should_stop, state.should_terminate))
