"""Everything lives in setup.cfg, but for ``celery_streams.pth``: it goes beside the package.

``celery_streams.pth`` imports ``_celery_streams_pth`` at interpreter start, which
registers the URL schemes with kombu when kombu.transport is imported (see that
module). A wheel carries it at its root (``build_py`` writes it into the build
directory, as setuptools ships ``distutils-precedence.pth``); an editable
install (``pip install -e .``, setuptools 64+) writes it into its wheel too.
"""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:   # setuptools < 64: no PEP 660 editable installs
    editable_wheel = None

PTH_NAME = 'celery_streams.pth'
#: One line, run by ``site`` at start; the module catches its own errors.
PTH_LINE = 'import _celery_streams_pth\n'


class build_py_with_pth(build_py):
    """``build_py`` that also writes ``celery_streams.pth`` at the root of the build."""

    def run(self):
        super().run()
        self.mkpath(self.build_lib)
        write_pth(self.build_lib)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_NAME)]

    def get_output_mapping(self):
        mapping = dict(super().get_output_mapping())
        mapping[os.path.join(self.build_lib, PTH_NAME)] = PTH_NAME
        return mapping


def write_pth(directory):
    """Write ``celery_streams.pth`` into ``directory``; return its path."""
    target = os.path.join(directory, PTH_NAME)
    with open(target, 'w') as pth:
        pth.write(PTH_LINE)
    return target


COMMANDS = {'build_py': build_py_with_pth}
if editable_wheel is not None:
    class editable_wheel_with_pth(editable_wheel):
        """An editable wheel with ``celery_streams.pth`` beside its own ``__editable__`` one
        (the lenient strategies drop what ``build_py`` writes)."""

        def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
            found = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
            write_pth(unpacked_wheel)
            return found

    COMMANDS['editable_wheel'] = editable_wheel_with_pth

setup(py_modules=['_celery_streams_pth'], cmdclass=COMMANDS)
