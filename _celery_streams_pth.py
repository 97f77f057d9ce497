"""Registers celery_streams' URL schemes with kombu in every process (``celery_streams.pth``).

A ``redis-streams://`` URL means this transport only once kombu knows the
scheme. ``celery worker`` learns it from the ``celery streams`` plugin; a
plain publisher that never imports ``celery_streams`` would get
``KeyError: 'No such transport: redis-streams'``. The ``celery_streams.pth``
file the package installs imports this module at interpreter start: it puts a
finder in front of ``sys.meta_path`` that waits for ``kombu.transport`` to be
imported, adds the schemes to its ``TRANSPORT_ALIASES`` right after, and
steps out of ``sys.meta_path``. It imports nothing of kombu or of the package
itself (a few microseconds at start), and it never raises: the worst case is
the behaviour without it. ``CELERY_STREAMS_NO_PTH=1`` turns it off.

Kept in step with ``celery_streams.urls.SCHEMES`` and ``TRANSPORT_PATH``
(``tests/test_wrong_transport_pth.py`` checks it).
"""
import os
import sys

#: The schemes and the transport they name (as ``celery_streams.urls`` has them).
SCHEMES = ('redis-streams', 'rediss-streams', 'sentinel-streams',
           'redis-streams+cluster', 'rediss-streams+cluster')
TRANSPORT = 'celery_streams.transport:Transport'
TARGET = 'kombu.transport'


def register(module):
    """Add the schemes to ``module.TRANSPORT_ALIASES`` (kombu.transport), keeping any set."""
    aliases = getattr(module, 'TRANSPORT_ALIASES', None)
    if isinstance(aliases, dict):
        for scheme in SCHEMES:
            aliases.setdefault(scheme, TRANSPORT)


class _Loader:
    """Runs kombu.transport's own loader, then registers the schemes; the module keeps its loader."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        spec = getattr(module, '__spec__', None)
        if spec is not None:
            spec.loader = self.loader
        module.__loader__ = self.loader
        self.loader.exec_module(module)
        try:
            register(module)
        except Exception:   # never break kombu's import
            pass


class Finder:
    """A ``sys.meta_path`` finder that answers for ``kombu.transport`` only, once."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != TARGET:
            return None
        uninstall()
        try:
            for finder in sys.meta_path:
                spec = finder.find_spec(name, path, target) if hasattr(finder, 'find_spec') else None
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, 'exec_module'):
                        spec.loader = _Loader(spec.loader)
                    return spec
        except Exception:
            pass
        return None


def uninstall():
    """Take the finder out of ``sys.meta_path`` (a no-op when it is not there)."""
    while Finder in sys.meta_path:
        sys.meta_path.remove(Finder)


def install():
    """Register now if kombu.transport is already imported, else wait for its import."""
    if os.environ.get('CELERY_STREAMS_NO_PTH'):
        return
    module = sys.modules.get(TARGET)
    if module is not None:
        register(module)
    elif Finder not in sys.meta_path:
        sys.meta_path.insert(0, Finder)


try:
    install()
except Exception:   # a .pth must never stop the interpreter
    pass
