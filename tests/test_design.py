"""The module map of docs/design.md ("Modules") against the code; no server needed.

Every module of the package (``cli/*`` included) has one entry, a bullet
``- **`name`** ... Imports `a`, `b`.`` (or ``Imports nothing of the package.``),
which lists exactly the package modules it imports, wherever in the module the
import is; and the entries are in an order in which each module imports only
modules listed before it (so the imports have no cycle).

Names are relative to the package (``keys``, ``cli.base``); the package's own
``__init__`` is ``celery_streams``.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / 'celery_streams'
DESIGN = ROOT / 'docs' / 'design.md'
TOP = 'celery_streams'

ENTRY = re.compile(r'^- \*\*`([\w.]+)`\*\*', re.MULTILINE)


def short(dotted: str) -> str:
    """``celery_streams.cli.base`` -> ``cli.base``; the package itself keeps its name."""
    return dotted[len(TOP) + 1:] if dotted.startswith(TOP + '.') else dotted


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix('').parts)
    if parts[-1] == '__init__':
        parts.pop()
    return '.'.join(parts) or TOP


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob('*.py'))}


def imports_of(path: Path, modules) -> set[str]:
    """The package modules ``path`` imports: ``from . import wire``, ``from .keys import Keys``,
    ``from ..connection import x``, ``import celery_streams``, at any depth of the module."""
    name = module_name(path)
    dotted = TOP if name == TOP else '%s.%s' % (TOP, name)
    package = dotted if path.name == '__init__.py' else dotted.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:   # relative: 1 is this package, 2 its parent...
                anchor = package.rsplit('.', node.level - 1)[0]
                base = anchor + ('.' + node.module if node.module else '')
            # ``from base import x``: x is a module if the package has one by that name
            targets = ['%s.%s' % (base, alias.name) if short('%s.%s' % (base, alias.name)) in modules
                       else base for alias in node.names]
        else:
            continue
        found.update(short(target) for target in targets
                     if target == TOP or target.startswith(TOP + '.'))
    return found


def documented() -> list[tuple[str, set[str]]]:
    """``(module, the modules its entry says it imports)`` for each entry, in order."""
    text = DESIGN.read_text()
    assert '\n## Modules\n' in text, 'docs/design.md has no "## Modules" section'
    section = text.split('\n## Modules\n', 1)[1].split('\n## ', 1)[0]
    starts = list(ENTRY.finditer(section))
    entries = []
    for match, following in zip(starts, starts[1:] + [None]):
        entry = section[match.start():following.start() if following else len(section)]
        entry = ' '.join(entry.split('\n\n')[0].split())   # the bullet, unwrapped
        _, said, imports = entry.rpartition(' Imports ')
        assert said, 'the entry of `%s` has no "Imports ..." sentence' % match[1]
        listed = [] if imports.startswith('nothing of the package') else re.findall(r'`([\w.]+)`', imports)
        assert len(listed) == len(set(listed)), 'the entry of `%s` names a module twice' % match[1]
        entries.append((match[1], set(listed)))
    return entries


def test_every_module_has_one_entry():
    names = [name for name, _ in documented()]
    modules = set(package_modules())
    twice = sorted({name for name in names if names.count(name) > 1})
    assert not twice, 'listed twice in docs/design.md, Modules: %s' % ', '.join(twice)
    missing, unknown = sorted(modules - set(names)), sorted(set(names) - modules)
    assert not (missing or unknown), (
        'docs/design.md, Modules: not listed: %s; listed, but no such module: %s'
        % (', '.join(missing) or '-', ', '.join(unknown) or '-'))


def test_every_entry_lists_exactly_what_its_module_imports():
    modules = package_modules()
    wrong = []
    for name, listed in documented():
        if name not in modules:
            continue   # test_every_module_has_one_entry says so
        real = imports_of(modules[name], modules)
        if listed != real:
            wrong.append('%s: listed but not imported: %s; imported but not listed: %s'
                         % (name, ', '.join(sorted(listed - real)) or '-',
                            ', '.join(sorted(real - listed)) or '-'))
    assert not wrong, 'docs/design.md, Modules, "Imports":\n' + '\n'.join(wrong)


def test_each_module_imports_only_modules_listed_before_it():
    modules = package_modules()
    before: set[str] = set()
    wrong = []
    for name, _ in documented():
        if name in modules:
            later = imports_of(modules[name], modules) - before
            if later:
                wrong.append('%s imports %s, listed after it (or not at all)'
                             % (name, ', '.join(sorted(later))))
        before.add(name)
    assert not wrong, 'docs/design.md, Modules, out of order:\n' + '\n'.join(wrong)
