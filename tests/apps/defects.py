"""Extra tasks for ``tests/test_delivery_defects.py``, on the app of ``tests/apps/e2e.py``.

Configured from the same environment (``E2E_BROKER``, ``E2E_BACKEND``,
``E2E_PREFIX``, ``E2E_PREFETCH``, ``E2E_ACKS_LATE``); run a worker with
``celery -A tests.apps.defects worker``: it has the e2e tasks too.
"""
import os

from tests.apps.e2e import _journal, add, app, record, sleep_then_record  # noqa: F401


@app.task(bind=True)
def retry_once(self, token):
    """Record every attempt under ``e2e:attempts:<prefix>``; retry the first one after 1 s."""
    _journal().rpush('e2e:attempts:' + os.environ.get('E2E_PREFIX', ''),
                     '%s:%d' % (token, self.request.retries))
    if self.request.retries == 0:
        raise self.retry(countdown=1)
    return record(token)
