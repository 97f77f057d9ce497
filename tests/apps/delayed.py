"""Tasks for ``tests/test_delayed_delivery.py``, on the app of ``tests/apps/e2e.py``.

Configured from the same environment (``E2E_BROKER``, ``E2E_BACKEND``,
``E2E_PREFIX``, ``E2E_PREFETCH``, ``E2E_ACKS_LATE``), plus ``E2E_DELAYED=0`` to
turn the ``delayed_delivery`` transport option off. Run a worker with
``celery -A tests.apps.delayed worker``: it has the e2e tasks too.
"""
import os
import time
from datetime import datetime, timezone

from tests.apps.e2e import _journal, add, app, record, sleep_then_record  # noqa: F401

app.conf.broker_transport_options = dict(app.conf.broker_transport_options,
                                         delayed_delivery=os.environ.get('E2E_DELAYED', '1') == '1')
PREFIX = os.environ.get('E2E_PREFIX', '')


@app.task(bind=True)
def record_lateness(self, token):
    """Record ``token`` and the seconds between the task's ETA and its start (``e2e:lateness:``)."""
    started = time.time()
    eta = self.request.eta
    if isinstance(eta, str):
        eta = datetime.fromisoformat(eta)
    if eta is not None and eta.tzinfo is None:
        eta = eta.replace(tzinfo=timezone.utc)
    if eta is not None:
        _journal().rpush('e2e:lateness:' + PREFIX, '%s:%.6f' % (token, started - eta.timestamp()))
    return record(token)


@app.task(bind=True)
def retry_later(self, token, countdown=2):
    """Record every attempt under ``e2e:attempts:<prefix>``; retry the first one after ``countdown``."""
    _journal().rpush('e2e:attempts:' + PREFIX, '%s:%d' % (token, self.request.retries))
    if self.request.retries == 0:
        raise self.retry(countdown=countdown)
    return record(token)
