"""Options shared by the ``celery streams`` commands: ``-y/--yes`` wherever ``-f/--force`` is,
"did you mean" for an unknown ``-Q`` queue name, and the one line of an unknown transport
option (the closest name only). On real servers, through the real click commands."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from celery_streams.errors import ConfigurationError
from celery_streams.options import Options
from tests.helpers import one_line

#: Every command that asks for confirmation, as (args, a key it removes or empties).
DESTRUCTIVE = {
    'drain': (['drain', '-Q', 'a'], lambda keys: keys.stream('a')),
    'nuke': (['nuke'], lambda keys: keys.stream('a')),
    'requeue': (['dead-letters', 'requeue'], lambda keys: keys.dead_letters('a')),
    'purge': (['dead-letters', 'purge'], lambda keys: keys.dead_letters('a')),
}


@pytest.mark.parametrize('flag', ['-y', '--yes'])
@pytest.mark.parametrize('command', sorted(DESTRUCTIVE))
def test_yes_is_force(run, state, command, flag):
    args, key = DESTRUCTIVE[command]
    stream = key(state.keys)
    assert state.redis.xlen(stream)
    result = run('--broker', state.url, 'streams', '--prefix', state.prefix, *args, flag)
    assert result.exit_code == 0, result.output
    assert not state.redis.exists(stream) or state.redis.xlen(stream) == 0
    assert '-f, -y, --force, --yes' in run('streams', *args, '--help').output


@pytest.mark.parametrize('args', [['drain', '-f'], ['status'], ['scheduled'], ['dead-letters', 'list'],
                                  ['dead-letters', 'purge', '-f']])
def test_an_unknown_queue_gets_the_closest_known_name(run, state, args):
    result = run('--broker', state.url, 'streams', '--prefix', state.prefix, *args, '-Q', 'b,aa')
    assert result.exit_code == 1
    assert one_line(result) == ("Error: unknown queue 'aa' under prefix '%s': no registry entry "
                                "and no stream (did you mean 'a'?)" % state.keys.prefix)
    two = run('--broker', state.url, 'streams', '--prefix', state.prefix, *args, '-Q', 'bb,aa,zzzz')
    assert one_line(two).endswith("(did you mean 'b' for 'bb', 'a' for 'aa'?)")
    none = run('--broker', state.url, 'streams', '--prefix', state.prefix, *args, '-Q', 'zzzz')
    assert one_line(none).endswith('no registry entry and no stream')


def test_an_unknown_transport_option_names_the_closest_only():
    with pytest.raises(ConfigurationError) as raised:
        Options.from_transport_options({'visibilty_timeout': 5, 'nothing_like_it': 1})
    message = str(raised.value)
    assert message == (
        "unknown transport option(s) 'nothing_like_it', 'visibilty_timeout' (did you mean "
        "'visibility_timeout'?) for celery_streams; its %d options are listed in "
        "docs/configuration.md (the docstring of celery_streams.options)"
        % len([f for f in fields(Options) if 'check' in f.metadata]))


def test_the_documented_unknown_option_line_is_the_real_one():
    with pytest.raises(ConfigurationError) as raised:
        Options.from_transport_options({'visibilty_timeout': 5})
    doc = Path(__file__).resolve().parent.parent / 'docs' / 'configuration.md'
    assert 'Error: %s\n' % raised.value in doc.read_text()
