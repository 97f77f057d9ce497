"""What a user sees when a worker or a command cannot start: one line that says what is wrong."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.workers import ROOT, clean_env, output_until_ready

APP = '''
import celery_streams
from celery import Celery
app = Celery('bad', broker=%r)
app.conf.broker_transport_options = %r
'''


def run_worker(tmp_path, broker, options, timeout=40):
    (tmp_path / 'badapp.py').write_text(APP % (broker, options))
    env = dict(clean_env(), PYTHONPATH=str(tmp_path) + ':' + str(ROOT))
    return subprocess.run([sys.executable, '-m', 'celery', '-A', 'badapp', 'worker', '-P', 'solo',
                           '-l', 'info'], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_an_unknown_option_is_one_line_with_the_closest_name(redis_server, tmp_path):
    done = run_worker(tmp_path, 'redis-streams://127.0.0.1:%d/0' % redis_server.port,
                      {'visibilty_timeout': 10})
    output = done.stdout + done.stderr
    assert done.returncode == 78, output[-3000:]
    assert 'Traceback' not in output, output[-3000:]
    [line] = [x for x in output.splitlines() if 'visibilty_timeout' in x]
    assert line.startswith('Error: unknown transport option') and "did you mean 'visibility_timeout'" in line


@pytest.mark.parametrize('what', ['password', 'database'])
def test_a_wrong_password_or_database_is_one_line(fresh_redis_server, tmp_path, what):
    server = fresh_redis_server(password='right')
    broker = ('redis-streams://:wrong@127.0.0.1:%d/0' % server.port if what == 'password'
              else 'redis-streams://:right@127.0.0.1:%d/99' % server.port)
    done = run_worker(tmp_path, broker, {})
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert 'Traceback' not in output, output[-3000:]
    [line] = [x for x in output.splitlines() if 'Unrecoverable error' in x or x.startswith('Error:')]
    assert ('credentials' in line) if what == 'password' else ('database' in line or 'DB index' in line), line
    assert 'wrong' not in line and 'right' not in line.replace('right', '', 0), line


def test_a_password_never_shows_when_a_url_does_not_parse():
    done = subprocess.run([sys.executable, '-m', 'celery', '--broker', 'redis://:pa/ss@127.0.0.1:1/0',
                           'streams', 'status'], env=clean_env(), capture_output=True, text=True,
                          timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert 'pa/ss' not in output and "'pa'" not in output and 'as pa' not in output, output
    assert 'redis://:**@127.0.0.1:1/0' in output, output


def test_ignored_option_warning_is_printed_once_per_worker(redis_server, tmp_path):
    (tmp_path / 'badapp.py').write_text(APP % ('redis-streams://127.0.0.1:%d/0' % redis_server.port,
                                               {'ack_emulation': True, 'global_keyprefix': 'once:'}))
    output = output_until_ready('badapp', tmp_path)
    assert output.count('mean nothing on Redis Streams') == 1, output[-3000:]
