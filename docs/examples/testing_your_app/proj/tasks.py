"""Tasks: one routed to its own queue, one that retries, the parts of a chain and a chord."""
from .celery import app


@app.task
def add(x, y):
    return x + y


@app.task
def total(numbers):
    return sum(numbers)


@app.task
def send_email(to):
    """Routed to the ``emails`` queue (``task_routes``)."""
    return 'sent to %s' % to


@app.task(bind=True, max_retries=3)
def flaky(self, succeed_after):
    """Fails (and retries) until it has been retried ``succeed_after`` times."""
    if self.request.retries < succeed_after:
        raise self.retry(countdown=0)
    return self.request.retries
