"""Celery 5.7.0's test package ``t`` (empty upstream), vendored for its integration tests:
see tests/celery_integration/conftest.py. Kept under its upstream name so that task names
(``t.integration.tasks.add``...) are the ones its tests assert."""
