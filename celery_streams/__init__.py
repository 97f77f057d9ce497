"""celery_streams: a Celery/Kombu broker transport on Redis Streams consumer groups.

Importing the package registers the URL schemes ``redis-streams://``,
``rediss-streams://`` (TLS), ``sentinel-streams://`` (Redis Sentinel) and
``redis-streams+cluster://`` / ``rediss-streams+cluster://`` (Redis Cluster:
the ``celery streams`` commands only, for now) with kombu, so a broker URL
alone selects the transport in this process. Import it where the Celery app
is created. An installed package does the same in every process without the
import: its ``celery_streams.pth`` registers the schemes as soon as
``kombu.transport`` is imported (``_celery_streams_pth``, docs/installation.md).
"""
from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES

from .connection import SCHEMES, TRANSPORT_PATH as TRANSPORT

__version__ = '0.1.0'

for _scheme in SCHEMES:
    TRANSPORT_ALIASES.setdefault(_scheme, TRANSPORT)

__all__ = ['TRANSPORT', '__version__']
