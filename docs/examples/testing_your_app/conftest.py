pytest_plugins = ['celery_streams.testing']
