"""Side-by-side benchmarks: celery_streams vs kombu's Redis transport vs RabbitMQ.

Run ``python -m benchmarks --help``; results and method are in docs/benchmarks.md.
"""
