"""The silent wrong transport (issue #24): ``redis://`` without ``broker_transport`` runs on
kombu's lists, and the commands, ``status``, ``drain`` and the worker say so in one line.

Real servers, real ``celery`` processes; kombu's lists are written by kombu's own Redis
transport (a Celery app on ``redis://``).
"""
from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time

import pytest
from celery import Celery
from kombu import Exchange, Queue

from celery_streams import diagnose
from tests.helpers import connection, publish
from tests.workers import ROOT, clean_env, output_until_ready

APP = '''
from celery import Celery
app = Celery('bad', broker=%r)
app.conf.broker_transport_options = {'global_keyprefix': %r}
app.conf.broker_transport = %r
'''
FIX = "set broker_transport = 'celery_streams.transport:Transport'"


def kombu_publish(server, prefix, n, queue='celery'):
    """``n`` tasks sent through kombu's Redis list transport (``redis://``, no broker_transport)."""
    app = Celery('kombu-lists', broker='redis://127.0.0.1:%d/0' % server.port, set_as_current=False)
    app.conf.broker_transport_options = {'global_keyprefix': prefix}
    try:
        for i in range(n):
            app.send_task('tasks.add', (i, i), queue=queue)
    finally:
        app.close()


def celery(tmp_path, *args, broker, prefix, transport=None, timeout=60):
    """``celery -A bad *args`` in a subprocess, the app on ``broker``."""
    (tmp_path / 'bad.py').write_text(APP % (broker, prefix, transport))
    env = dict(clean_env(), PYTHONPATH='%s:%s' % (tmp_path, ROOT))
    return subprocess.run([sys.executable, '-m', 'celery', '-A', 'bad'] + list(args), cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=timeout)


def read_until(process, done, timeout):
    """The lines ``process`` writes until ``done(line)`` or ``timeout`` seconds (beat prints
    nothing more once started: a plain loop over its output would wait forever)."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    got, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            break
        got.append(line.rstrip('\n'))
        if done(line):
            break
    return got


def warnings_of(text):
    return [line for line in text.splitlines() if 'selects kombu' in line]


def test_status_drain_and_nuke_say_the_app_is_on_kombus_lists(redis_server, tmp_path, unique_name):
    """The issue's first example: `status`, `drain` and `nuke` on a redis:// app no longer stay
    silent."""
    prefix = unique_name + ':'
    kombu_publish(redis_server, prefix, 2)
    broker = 'redis://127.0.0.1:%d/0' % redis_server.port
    status = celery(tmp_path, 'streams', 'status', broker=broker, prefix=prefix)
    assert status.returncode == 0, status.stderr
    [warning] = warnings_of(status.stderr)
    assert warning.startswith('Warning: broker_url %s ' % broker), warning
    assert 'use redis-streams://127.0.0.1:%d/0' % redis_server.port in warning and FIX in warning
    note = ("Note: kombu's Redis list transport has keys under prefix %r in db 0: "
            "2 messages in its lists (celery: 2), bindings of 1 exchange (celery)." % prefix)
    assert note in status.stdout.splitlines(), status.stdout

    drain = celery(tmp_path, 'streams', 'drain', '-f', broker=broker, prefix=prefix)
    assert drain.returncode == 0 and len(warnings_of(drain.stderr)) == 1, drain.stderr
    lines = drain.stdout.splitlines()
    assert 'nothing to drain' in lines[1] and lines[2] == note, drain.stdout
    assert redis_server.client().llen(prefix + 'celery') == 2   # drain leaves kombu's lists alone

    nuke = celery(tmp_path, 'streams', 'nuke', '-f', broker=broker, prefix=prefix)
    assert nuke.returncode == 0 and len(warnings_of(nuke.stderr)) == 1, nuke.stderr
    lines = nuke.stdout.splitlines()
    assert 'nothing to nuke' in lines[1] and lines[2] == note, nuke.stdout
    assert redis_server.client().llen(prefix + 'celery') == 2   # not the transport's keys


@pytest.mark.parametrize('broker, transport, warns', [
    ('redis://127.0.0.1:{port}/0', None, True),
    ('redis://127.0.0.1:{port}/0', 'redis', False),   # lists chosen on purpose
    ('redis-streams://127.0.0.1:{port}/0', None, False),
])
def test_a_worker_on_kombus_lists_warns_once_at_startup(redis_server, tmp_path, unique_name, broker,
                                                        transport, warns):
    (tmp_path / 'bad.py').write_text(APP % (broker.format(port=redis_server.port), unique_name + ':',
                                            transport))
    output = output_until_ready('bad', tmp_path)
    assert 'ready.' in output, output[-3000:]
    found = warnings_of(output)
    assert len(found) == (1 if warns else 0), output[-3000:]
    if warns:
        assert 'WARNING' in found[0] and 'celery_streams: broker_url redis://' in found[0]
        assert FIX in found[0]


def test_celery_beat_on_kombus_lists_warns_at_startup(redis_server, tmp_path, unique_name):
    """beat publishes too: a beat on redis:// feeds lists no streams worker reads."""
    (tmp_path / 'bad.py').write_text(APP % ('redis://127.0.0.1:%d/0' % redis_server.port,
                                            unique_name + ':', None))
    env = dict(clean_env(), PYTHONPATH='%s:%s' % (tmp_path, ROOT))
    beat = subprocess.Popen([sys.executable, '-m', 'celery', '-A', 'bad', 'beat', '-l', 'info',
                             '-s', str(tmp_path / 'schedule')], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = read_until(beat, lambda line: warnings_of(line) or 'Sending due task' in line, 30)
    finally:
        beat.terminate()
        beat.wait(timeout=30)
    found = warnings_of('\n'.join(lines))
    assert len(found) == 1 and FIX in found[0], ''.join(lines)[-3000:]


def test_a_worker_on_streams_tells_of_kombu_lists_under_its_prefix(redis_server, tmp_path, unique_name):
    """The split seen from the worker: a web process on redis:// left messages in kombu's lists."""
    prefix = unique_name + ':'
    kombu_publish(redis_server, prefix, 2)
    (tmp_path / 'bad.py').write_text(APP % ('redis-streams://127.0.0.1:%d/0' % redis_server.port,
                                            prefix, None))
    env = dict(clean_env(), PYTHONPATH='%s:%s' % (tmp_path, ROOT))
    worker = subprocess.Popen([sys.executable, '-m', 'celery', '-A', 'bad', 'worker', '-P', 'solo',
                               '-l', 'info'], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        lines = read_until(worker, lambda line: 'this worker never reads it' in line, 60)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    found = [line for line in lines if 'this worker never reads it' in line]
    assert len(found) == 1, '\n'.join(lines)[-3000:]
    assert ("WARNING/MainProcess] celery_streams: kombu's Redis list transport has keys under prefix "
            "%r in db 0: 2 messages in its lists (celery: 2)" % prefix) in found[0], found[0]
    assert not warnings_of('\n'.join(lines))


def test_status_tells_of_kombu_lists_beside_the_streams(redis_server, unique_name, run):
    """The realistic split: workers on streams, a web process on kombu's lists."""
    prefix = unique_name + ':'
    with connection(redis_server, prefix) as conn:
        publish(conn, 'celery', 'celery', [{'n': 1}], declare=[Queue('celery', Exchange('celery'), 'celery')])
    kombu_publish(redis_server, prefix, 3)
    url = 'redis-streams://127.0.0.1:%d/0' % redis_server.port
    done = run('--broker', url, 'streams', '--prefix', prefix, 'status')
    assert done.exit_code == 0, done.output
    lines = done.stdout.splitlines()
    assert any(line.split()[:1] == ['celery'] for line in lines), done.stdout   # the stream's row
    assert ("kombu's Redis list transport has keys under prefix %r in db 0: 3 messages in its lists "
            "(celery: 3)" % prefix) in done.stdout
    assert 'never read it' in lines[-1] and not warnings_of(done.stderr), done.output

    as_json = run('--broker', url, 'streams', '--prefix', prefix, 'status', '--json')
    assert json.loads(as_json.output)['queues'], as_json.output   # the notes stay off the JSON


def test_status_finds_the_keys_in_another_db_or_prefix(fresh_redis_server, run):
    server = fresh_redis_server()
    for db, prefix in ((1, 'eco2:'), (0, 'other:')):
        url = 'redis-streams://127.0.0.1:%d/%d' % (server.port, db)
        with connection(url, prefix) as conn:
            publish(conn, 'q', 'q', [{'n': 1}], declare=[Queue('q', Exchange('q'), 'q')])
    done = run('--broker', 'redis://127.0.0.1:%d/0' % server.port, 'streams', '--prefix', 'eco2:',
               'status')
    assert done.exit_code == 0, done.output
    assert done.stdout.splitlines()[-1] == (
        "Note: nothing of celery_streams under prefix 'eco2:' in db 0, but its keys are in "
        "db 0 (prefix 'other:'), db 1 (prefix 'eco2:'): check the database in broker_url and "
        "global_keyprefix in broker_transport_options."), done.stdout
    # where the keys are, nothing is said
    here = run('--broker', 'redis://127.0.0.1:%d/1' % server.port, 'streams', '--prefix', 'eco2:',
               'status')
    assert 'Note:' not in here.output, here.output


def conf(**settings):
    app = Celery('conf', set_as_current=False)
    app.conf.update(settings)
    return app.conf


@pytest.mark.parametrize('settings, setting, fixed', [
    (dict(broker_url='redis://h:6379/0'), 'broker_url', 'redis-streams://h:6379/0'),
    (dict(broker_url='rediss://:secret@h:6380/1'), 'broker_url', 'rediss-streams://:**@h:6380/1'),
    (dict(broker_url='sentinel://s1:26379;sentinel://s2:26379'), 'broker_url',
     'sentinel-streams://s1:26379'),
    (dict(broker_url='redis-streams://h/0', broker_write_url='redis://h/0'), 'broker_write_url',
     'redis-streams://h/0'),
])
def test_the_warning_names_the_setting_and_the_fix(settings, setting, fixed):
    line = diagnose.list_transport_warning(conf(**settings))
    assert line.startswith(setting + ' ') and 'use %s or ' % fixed in line and FIX in line, line
    assert 'secret' not in line and '\n' not in line


@pytest.mark.parametrize('settings', [
    dict(broker_url='redis-streams://h/0'),
    dict(broker_url='redis://h/0', broker_transport='celery_streams.transport:Transport'),
    dict(broker_url='redis://h/0', broker_transport='redis'),
    dict(broker_url='amqp://h//'),
    dict(),
])
def test_no_warning_off_kombus_lists(settings):
    assert diagnose.list_transport_warning(conf(**settings)) is None


def test_the_worker_receiver_never_raises():
    diagnose.warn_worker(sender='w@h', instance=None, conf=None)   # nothing to read: no warning
