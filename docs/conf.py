"""Sphinx configuration for the celery_streams documentation.

Build: ``tox -e docs`` (``sphinx-build -W -b html docs docs/_build/html``);
warnings are errors. Pages are Markdown (myst-parser); the API reference is the
modules' own docstrings (autodoc); the CLI reference is generated from the
click definitions (sphinx-click), so neither can drift from the code.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # build from a checkout without installing the package

project = 'celery-streams'
author = 'the celery-streams authors'
copyright = 'the celery-streams authors'
# Read, not imported: the version is known before autodoc imports anything.
release = re.search(r"__version__ = '([^']+)'", (ROOT / 'celery_streams' / '__init__.py').read_text())[1]
version = '.'.join(release.split('.')[:2])

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx_click',
]

source_suffix = {'.md': 'markdown', '.rst': 'restructuredtext'}
root_doc = 'index'
exclude_patterns = ['_build', 'requirements.txt', 'Thumbs.db', '.DS_Store']

# -- MyST ---------------------------------------------------------------------
myst_enable_extensions = ['colon_fence', 'deflist']
myst_heading_anchors = 3

# -- autodoc ------------------------------------------------------------------
autodoc_member_order = 'bysource'
autodoc_typehints = 'description'
autodoc_default_options = {'show-inheritance': False}
# celery_streams.testing is a pytest plugin; the docs environment needs no pytest.
autodoc_mock_imports = [] if importlib.util.find_spec('pytest') else ['pytest']

# -- HTML ---------------------------------------------------------------------
html_theme = 'furo' if importlib.util.find_spec('furo') else 'alabaster'
html_title = 'celery-streams %s' % release
html_static_path: list[str] = []


# -- docstring repair ---------------------------------------------------------
def _widen_first_column(lines: list[str]) -> None:
    """Widen the first column of a simple table whose names overflow it, in place.

    docutils rejects a simple table in which a cell of any column but the last
    runs past its column (``socket_keepalive_options`` in the options table).
    Rows are rebuilt with the first column as wide as its longest name; a
    well-formed table is left as it is.
    """
    borders = [i for i, line in enumerate(lines)
               if line.strip() and set(line.strip()) <= {'=', ' '} and line.lstrip().startswith('=')]
    for first, last in zip(borders[::3], borders[2::3]):
        rule = lines[first]
        indent = len(rule) - len(rule.lstrip())
        spans, col = [], indent
        for chunk in rule[indent:].split(' '):
            if chunk:
                spans.append((col, col + len(chunk)))
            col += len(chunk) + 1
        if len(spans) < 3:
            continue
        (s0, e0), (s1, e1), (s2, _) = spans[:3]
        rows = range(first + 1, last)
        names = [lines[i][s0:].split(' ', 1)[0] for i in rows if lines[i][s0:s0 + 1].strip()]
        width = max([e0 - s0, *map(len, names)])
        if width == e0 - s0:
            continue
        pad = ' ' * indent

        def rebuild(line, name, second):
            return pad + name.ljust(width) + '  ' + second.ljust(e1 - s1) + '  ' + line[s2:]

        for i in range(first, last + 1):
            line = lines[i]
            if i in (first, last) or i == borders[borders.index(first) + 1]:
                lines[i] = rebuild(line, '=' * width, '=' * (e1 - s1))
            elif line[s0:s0 + 1].strip():
                name = line[s0:].split(' ', 1)[0]
                lines[i] = rebuild(line, name, line[s0 + len(name):s2].strip())
            elif line.strip():
                lines[i] = rebuild(line, '', line[s1:s2].strip())


def _repair_docstring(app, what, name, obj, options, lines):
    if what == 'module':
        _widen_first_column(lines)


def setup(app):
    app.connect('autodoc-process-docstring', _repair_docstring)
