"""The app, configured for production: tests point it at their own server."""
from celery import Celery

app = Celery('proj', broker='redis-streams://localhost:6379/0',
             backend='redis://localhost:6379/0', include=['proj.tasks'])
app.conf.update(
    task_routes={'proj.tasks.send_email': {'queue': 'emails'}},
    broker_transport_options={'max_deliveries': 5},
)
