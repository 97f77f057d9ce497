"""A small Celery project: its app is ``proj.celery:app``."""
