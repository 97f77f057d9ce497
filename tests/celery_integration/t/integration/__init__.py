"""Celery 5.7.0's ``t/integration`` (empty upstream); the vendored files carry Celery's
BSD license. See tests/celery_integration/conftest.py."""
