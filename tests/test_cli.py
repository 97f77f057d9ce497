"""``celery streams`` through Celery's own ``celery`` group (CliRunner) and the real executable."""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from celery_streams import admin
from tests import servers
from tests.helpers import one_line, port_url, snapshot
from tests.workers import ROOT, clean_env

CELERY = str(Path(sys.executable).with_name('celery'))


@pytest.fixture
def app_module(tmp_path, monkeypatch, unique_name):
    """``app_module(broker_url, **settings) -> module name`` of a tiny Celery app for ``-A``."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(broker_url, **settings):
        name = 'proj_%s_%d' % (unique_name, len(list(tmp_path.glob('proj_*.py'))))
        (tmp_path / (name + '.py')).write_text(textwrap.dedent('''\
            import celery_streams
            from celery import Celery

            app = Celery(%r, broker=%r, set_as_current=False)
            app.conf.update(%r)
            ''' % (name, broker_url, settings)))
        return name
    return make


# -- help and drain -------------------------------------------------------------

def test_help_lists_the_subcommands(run):
    assert 'streams' in run('--help').output
    result = run('streams', '--help')
    assert result.exit_code == 0
    for name in ('drain', 'nuke', 'status'):
        assert name in result.output
    assert '--dead-letters' in run('streams', 'drain', '--help').output


def test_drain_keeps_groups_removes_entries_and_pending(run, state):
    r, keys = state.redis, state.keys
    groups = {q: [g['name'] for g in r.xinfo_groups(keys.stream(q))] for q in ('a', 'b', 'bq')}
    consumers = r.xinfo_consumers(keys.stream('a'), 'celery')

    result = run('--broker', state.url, 'streams', 'drain', '--prefix', state.prefix, '-f')

    assert result.exit_code == 0, result.output
    assert "Drained queue 'a' (task): 5 messages, 2 pending entries; groups kept: celery" in result.output
    assert "Drained queue 'b' (task): 3 messages, 0 pending entries; groups kept: celery" in result.output
    assert 'reserved' in result.output   # the note about messages already in a worker
    for q in ('a', 'b'):
        assert r.xlen(keys.stream(q)) == 0
        assert r.xpending(keys.stream(q), 'celery')['pending'] == 0
    assert {q: [g['name'] for g in r.xinfo_groups(keys.stream(q))] for q in groups} == groups
    assert [c['name'] for c in r.xinfo_consumers(keys.stream('a'), 'celery')] == [
        c['name'] for c in consumers]
    assert r.xlen(keys.stream('bq')) == 2 and r.xlen(keys.dead_letters('a')) == 1


def test_drain_of_empty_queues_asks_nothing(run, state):
    """Nothing to remove: no 'remove 0 messages?' question, even without a terminal or -f."""
    assert run('--broker', state.url, 'streams', 'drain', '--prefix', state.prefix, '-f').exit_code == 0
    result = run('--broker', state.url, 'streams', 'drain', '--prefix', state.prefix)
    assert result.exit_code == 0, result.output
    assert 'Nothing to drain in 2 queues: a, b.' in result.output and 'sure' not in result.output


def test_drain_selected_queues_with_broadcast_and_dead_letters(run, state):
    result = run('--broker', state.url, 'streams', '--prefix', state.prefix, 'drain', '-f',
                 '-Q', 'a,bq', '--include-broadcast', '--dead-letters')
    assert result.exit_code == 0, result.output
    assert "queue 'bq' (fanout): 2 messages" in result.output
    assert '1 dead letter;' in result.output
    assert state.redis.xlen(state.keys.stream('b')) == 3
    assert state.redis.xlen(state.keys.dead_letters('a')) == 0


def test_drain_of_an_unknown_queue_fails_in_one_line(run, state):
    before = snapshot(state.redis, state.prefix)
    result = run('--broker', state.url, 'streams', 'drain', '--prefix', state.prefix, '-f', '-Q', 'a,nope')
    assert result.exit_code != 0
    assert "unknown queue 'nope'" in one_line(result)
    assert snapshot(state.redis, state.prefix) == before


def test_drain_of_a_broadcast_queue_needs_include_broadcast(run, state):
    result = run('--broker', state.url, 'streams', 'drain', '--prefix', state.prefix, '-f', '-Q', 'bq')
    assert result.exit_code != 0
    assert '--include-broadcast' in one_line(result)
    assert state.redis.xlen(state.keys.stream('bq')) == 2


@pytest.mark.parametrize('command', ['drain', 'nuke'])
def test_without_a_terminal_or_force_nothing_happens(run, state, command):
    before = snapshot(state.redis, state.prefix)
    result = run('--broker', state.url, 'streams', command, '--prefix', state.prefix)
    assert result.exit_code != 0
    assert 'stdin is not a terminal' in one_line(result)
    assert snapshot(state.redis, state.prefix) == before


def test_dry_runs_say_what_they_would_do_and_change_nothing(run, state):
    before = snapshot(state.redis, state.prefix)
    result = run('--broker', state.url, 'streams', 'drain', '--prefix', state.prefix,
                 '--dry-run', '--dead-letters')
    assert result.exit_code == 0, result.output
    assert ("Would drain queue 'a' (task): 5 messages, 2 pending entries, 1 dead letter; "
            "groups kept: celery") in result.output
    assert 'nothing was changed' in result.output

    result = run('--broker', state.url, 'streams', 'nuke', '--prefix', state.prefix, '--dry-run')
    assert result.exit_code == 0, result.output
    # other keys: 3 queue ledgers (celery_streams.ledger), the registry, schema, bindings...
    assert 'Would destroy 3 consumer groups, 4 streams and 9 other keys.' in result.output
    assert state.keys.queues in result.output
    assert snapshot(state.redis, state.prefix) == before


# -- nuke and the app's settings ------------------------------------------------

def test_nuke_from_the_app_settings_leaves_other_keys_alone(run, state, app_module, redis_server,
                                                           unique_name, streams_state):  # noqa: F811
    other = streams_state(redis_server, unique_name + 'other:')
    other.task_queue('a', published=2, reserved=1)
    other_before = snapshot(state.redis, other.prefix)
    outside = unique_name + ':outside'
    state.redis.set(outside, 'x')
    module = app_module(state.url, broker_transport_options={'global_keyprefix': state.prefix})

    result = run('-A', module, 'streams', 'nuke', '-f')

    assert result.exit_code == 0, result.output
    assert 'Destroyed 3 consumer groups, 4 streams and 9 other keys.' in result.output   # 3 ledgers
    assert list(state.redis.scan_iter(match=state.keys.match_all)) == []
    assert snapshot(state.redis, other.prefix) == other_before
    assert state.redis.get(outside) == 'x'


def test_prefix_option_overrides_the_app_setting(run, state, app_module):
    module = app_module(state.url, broker_transport_options={'global_keyprefix': 'elsewhere:'})
    result = run('-A', module, 'streams', 'status', '--json')
    assert json.loads(result.output)['queues'] == []
    for args in (['streams', '--prefix', state.prefix, 'status', '--json'],
                 ['streams', 'status', '--json', '--prefix', state.prefix]):
        doc = json.loads(run('-A', module, *args).output)
        assert doc['global_keyprefix'] == state.prefix
        assert [q['name'] for q in doc['queues']] == ['a', 'b', 'bq']


# -- status ---------------------------------------------------------------------

def test_status_json_is_one_document_of_the_documented_shape(run, state):
    result = run('--broker', state.url, 'streams', 'status', '--prefix', state.prefix, '--json')
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert set(doc) == {'broker', 'server', 'global_keyprefix', 'namespace', 'consumer_group',
                        'schema', 'queues', 'rate_limits'}
    assert doc['rate_limits'] == []
    assert doc['consumer_group'] == 'celery' and doc['namespace'] == state.keys.prefix
    queues = {q['name']: q for q in doc['queues']}
    assert set(queues['a']) == {'name', 'kind', 'stream', 'streams', 'exists', 'length', 'waiting',
                                'pending', 'oldest_pending_age', 'dead_letters', 'groups',
                                'entries_added', 'alive_consumers', 'scheduled', 'next_due_in',
                                'internal', 'consumers', 'stale_consumers', 'shards'}
    a = queues['a']
    assert (a['scheduled'], a['next_due_in']) == (0, None)
    assert a['entries_added'] in (None, 6)   # 5 tasks + 1 dead-lettered entry; None on Redis 6.2
    assert (a['length'], a['waiting'], a['pending'], a['dead_letters']) == (5, 3, 2, 1)
    [group] = a['groups']
    assert set(group) == {'name', 'stream', 'bucket', 'consumers', 'pending', 'last_delivered_id',
                          'entries_read', 'lag', 'oldest_pending_age'}
    assert set(group['consumers'][0]) == {'name', 'pending', 'idle_ms', 'alive'}
    assert queues['bq']['kind'] == 'fanout'

    only = json.loads(run('--broker', state.url, 'streams', 'status', '--prefix', state.prefix,
                          '--json', '-Q', 'b').output)
    assert [q['name'] for q in only['queues']] == ['b']


def test_status_table(run, state):
    result = run('--broker', state.url, 'streams', 'status', '--prefix', state.prefix)
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if line.startswith('QUEUE'))
    assert header.split() == ['QUEUE', 'READY', 'UNACKED', 'CONSUMERS', 'OLDEST', 'SCHED', 'DEAD']
    row = next(line for line in result.output.splitlines() if line.startswith('a '))
    assert row.split()[:3] == ['a', '3', '2'] and row.split()[-2:] == ['0', '1']
    assert 'bq' not in result.output and '(1 queue hidden' in result.output   # broadcast: -v
    assert 'group celery' not in result.output
    verbose = run('--broker', state.url, 'streams', 'status', '--prefix', state.prefix, '-v')
    header = next(line for line in verbose.output.splitlines() if line.startswith('QUEUE'))
    assert header.split() == ['QUEUE', 'KIND', 'READY', 'UNACKED', 'CONSUMERS', 'LENGTH', 'OLDEST',
                              'SCHED', 'DEAD']
    row = next(line for line in verbose.output.splitlines() if line.startswith('a '))
    assert row.split()[:4] == ['a', 'task', '3', '2'] and row.split()[5] == '5'
    assert 'group celery: 1 consumer, pending 2' in verbose.output
    assert any(line.startswith('bq ') for line in verbose.output.splitlines())


def test_status_of_an_unknown_queue_fails_in_one_line(run, state):
    result = run('--broker', state.url, 'streams', 'status', '--prefix', state.prefix, '-Q', 'nope')
    assert result.exit_code != 0 and "unknown queue 'nope'" in one_line(result)


# -- errors -----------------------------------------------------------------------

def test_a_url_that_is_not_redis_fails_in_one_line(run):
    result = run('--broker', 'amqp://guest:secret@localhost//', 'streams', 'status')
    assert result.exit_code != 0
    line = one_line(result)
    assert 'not a Redis URL' in line and 'secret' not in line


def test_without_a_broker_url_fails_in_one_line(run, app_module):
    result = run('-A', app_module(None), 'streams', 'status')
    assert result.exit_code != 0 and 'no broker URL' in one_line(result)


def test_an_unreachable_server_fails_in_one_line(run):
    url = port_url(servers.free_port())
    result = run('--broker', url, 'streams', 'status')
    assert result.exit_code == 69
    assert 'cannot reach Redis' in one_line(result)


def test_a_wrong_password_fails_in_one_line_and_no_password_is_printed(run, fresh_redis_server,
                                                                      unique_name):
    server = fresh_redis_server(password='right-' + unique_name)
    wrong = server.url_for(password='wrong-' + unique_name)
    result = run('--broker', wrong, 'streams', 'status', '--prefix', unique_name)
    assert result.exit_code == 69
    assert 'refused the credentials' in one_line(result)
    assert 'wrong-' not in result.output

    result = run('--broker', server.url_for(password='right-' + unique_name),
                 'streams', 'status', '--prefix', unique_name, '--json')
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)['broker'] == 'redis://:**@127.0.0.1:%d/0' % server.port
    assert 'right-' not in result.output


def test_tls_from_the_url_and_from_broker_use_ssl(run, tls_redis_server, app_module, unique_name):
    ca = tls_redis_server.tls.ca_cert
    url = 'rediss-streams://127.0.0.1:%d/0' % tls_redis_server.port
    result = run('--broker', url + '?ssl_cert_reqs=required&ssl_ca_certs=' + ca,
                 'streams', 'status', '--prefix', unique_name, '--json')
    assert result.exit_code == 0, result.output

    module = app_module(url, broker_use_ssl={'ssl_cert_reqs': 'required', 'ssl_ca_certs': ca},
                        broker_transport_options={'global_keyprefix': unique_name})
    result = run('-A', module, 'streams', 'status', '--json')
    assert result.exit_code == 0, result.output

    result = run('--broker', url, 'streams', 'status', '--prefix', unique_name)   # untrusted CA
    assert result.exit_code == 69 and 'cannot reach Redis' in one_line(result)


# -- the real executable ------------------------------------------------------------

def celery_env(tmp_path):
    env = clean_env()
    env['PYTHONPATH'] = os.pathsep.join([str(tmp_path), str(ROOT)])
    return env


def test_the_celery_executable_runs_status_and_drain(state, app_module, tmp_path):
    module = app_module(state.url, broker_transport_options={'global_keyprefix': state.prefix})
    env = celery_env(tmp_path)
    status = subprocess.run([CELERY, '-A', module, 'streams', 'status', '--json'], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert [q['name'] for q in json.loads(status.stdout)['queues']] == ['a', 'b', 'bq']

    refused = subprocess.run([CELERY, '-A', module, 'streams', 'drain'], env=env, cwd=tmp_path,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and refused.stdout == ''
    assert len(refused.stderr.strip().splitlines()) == 1
    assert state.redis.xlen(state.keys.stream('a')) == 5


def run_in_terminal(args, answer, env, cwd, timeout=60):
    """Run ``args`` on a pseudo-terminal, answer the prompt, return (exit status, output)."""
    master, slave = os.openpty()
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd)
    os.close(slave)
    output, answered, deadline = b'', False, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:   # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            if not answered and b'Are you sure?' in output:
                os.write(master, answer.encode() + b'\n')
                answered = True
            if proc.poll() is not None and not ready:
                break
        return proc.wait(timeout=10), output.decode(errors='replace')
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_the_prompt_on_a_terminal(state, app_module, tmp_path):
    module = app_module(state.url, broker_transport_options={'global_keyprefix': state.prefix})
    args = [CELERY, '-A', module, 'streams', 'drain', '-Q', 'a']
    before = snapshot(state.redis, state.prefix)

    code, output = run_in_terminal(args, 'n', celery_env(tmp_path), tmp_path)
    assert code != 0 and 'This will remove 5 messages and 2 pending entries from 1 queue: a.' in output
    assert snapshot(state.redis, state.prefix) == before

    code, output = run_in_terminal(args, 'y', celery_env(tmp_path), tmp_path)
    assert code == 0, output
    assert "Drained queue 'a' (task): 5 messages, 2 pending entries" in output
    assert state.redis.xlen(state.keys.stream('a')) == 0


def test_an_acl_user_limited_to_the_prefix_and_without_keys_or_flush(run, state, redis_server,
                                                                     unique_name):
    admin_client = state.redis
    servers.create_acl_user(admin_client, unique_name, 'pw', key_patterns=[state.prefix + '*'],
                            commands=['+@all', '-keys', '-flushdb', '-flushall'])
    try:
        url = redis_server.url_for(unique_name, 'pw')
        for args in (['status', '--json'], ['drain', '-f'], ['nuke', '-f']):
            result = run('--broker', url, 'streams', '--prefix', state.prefix, *args)
            assert result.exit_code == 0, result.output
            assert 'pw@' not in result.output
        assert list(admin_client.scan_iter(match=state.keys.match_all)) == []

        servers.create_acl_user(admin_client, unique_name, 'pw', key_patterns=[state.prefix + '*'],
                                commands=['+@all', '-scan'])
        result = run('--broker', url, 'streams', '--prefix', state.prefix, 'nuke', '-f')
        assert result.exit_code == 69
        assert 'refused the command' in one_line(result)
    finally:
        admin_client.acl_deluser(unique_name)


def test_the_documented_acl_rules_are_enough(run, state, redis_server, unique_name):
    state.redis.execute_command('ACL', 'SETUSER', unique_name, 'reset', 'on', '>pw',
                                *admin.acl_rules(state.prefix))
    try:
        url = redis_server.url_for(unique_name, 'pw')
        for args in (['status'], ['drain', '-f', '--include-broadcast', '--dead-letters'],
                     ['nuke', '-f']):
            result = run('--broker', url, 'streams', '--prefix', state.prefix, *args)
            assert result.exit_code == 0, result.output
        assert list(state.redis.scan_iter(match=state.keys.match_all)) == []
    finally:
        state.redis.acl_deluser(unique_name)
