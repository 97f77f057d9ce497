"""celery_streams: a Celery/Kombu broker transport on Redis Streams consumer groups.

Importing the package registers the URL schemes ``redis-streams://``,
``rediss-streams://`` (TLS) and ``sentinel-streams://`` (Redis Sentinel) with
kombu, so a broker URL alone selects the transport in this process. Import it
where the Celery app is created.
"""
from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES

__version__ = '0.1.0'

TRANSPORT = 'celery_streams.transport:Transport'

for _scheme in ('redis-streams', 'rediss-streams', 'sentinel-streams'):
    TRANSPORT_ALIASES.setdefault(_scheme, TRANSPORT)

__all__ = ['TRANSPORT', '__version__']
