"""The e2e app, as Flower loads it with ``-A``: importing celery_streams.flower there is the
documented way to give Flower this transport's queue lengths."""
import celery_streams.flower  # noqa: F401
from tests.apps.e2e import app  # noqa: F401
