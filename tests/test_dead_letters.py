"""``celery streams dead-letters list|requeue|purge`` and their admin functions, on real servers.

Dead letters are made for real: junk XADDed into a queue stream and read
through kombu (the transport dead-letters it as undecodable), and a Celery
task message requeued by its consumer until ``max_deliveries=1`` moves it.
"""
from __future__ import annotations

import base64
import json
import re

import pytest
from celery import Celery
from kombu import Exchange, Queue

import celery_streams  # noqa: F401  (registers redis-streams://)
from celery_streams import admin, deadletters
from celery_streams.keys import Keys
from tests.helpers import connection, consume, delete_keys, one_line, snapshot, streams_url

JUNK = b'\xff not json'


def work_queue(name='work'):
    return Queue(name, Exchange(name), name)


class DeadLetters:
    """Queue ``work`` under ``prefix`` with two dead letters: ``junk`` first, then ``task``."""

    def __init__(self, server, prefix):
        self.server, self.prefix, self.url = server, prefix, streams_url(server)
        self.keys = Keys(prefix)
        # the junk payload is not UTF-8: keep its bytes as surrogates
        self.redis = server.client(decode_responses=True, encoding_errors='surrogateescape')
        self.dead = self.keys.dead_letters('work')
        app = Celery('deadletters', broker=self.url, set_as_current=False)
        app.conf.broker_transport_options = {'global_keyprefix': prefix}
        try:
            with connection(server, prefix) as conn:   # declare the queue (stream, group, binding)
                work_queue()(conn.default_channel).declare()
            self.junk_source_id = self.redis.xadd(self.keys.stream('work'), {'payload': JUNK})
            self.task_id = app.send_task('proj.add', args=(2, 2), queue='work').id
        finally:
            app.close()
        with connection(server, prefix, max_deliveries=1) as conn:
            self.seen = consume(conn, work_queue(), requeue=True, timeout=10, must=True,
                                until=lambda got: self.redis.xlen(self.dead) == 2)
        assert len(self.seen) == 1   # delivered once, requeued, dead-lettered on the next read
        (self.junk_id, junk), (self.task_dead_id, task) = self.redis.xrange(self.dead)
        assert junk['reason'].startswith('undecodable entry')
        assert 'max_deliveries=1' in task['reason'] and task['field:deliveries'] == '1'
        self.task_payload = task['field:payload']
        assert self.redis.xlen(self.keys.stream('work')) == 0

    def cli(self, run, *args):
        return run('--broker', self.url, 'streams', '--prefix', self.prefix, *args)

    def delete_keys(self):
        delete_keys(self.redis, self.prefix)
        self.redis.close()


@pytest.fixture
def dl(redis_server, prefix, monkeypatch):
    # Celery prefers CELERY_BROKER_URL to the app's broker: one leaked by an earlier
    # `celery --broker` would send the task to another server
    monkeypatch.delenv('CELERY_BROKER_URL', raising=False)
    state = DeadLetters(redis_server, prefix)
    yield state
    state.delete_keys()


# -- list and show ------------------------------------------------------------------

def test_list_shows_the_task_and_its_arguments(run, dl):
    result = dl.cli(run, 'dead-letters', 'list')
    assert result.exit_code == 0, result.output
    [line] = [x for x in result.output.splitlines() if dl.task_dead_id in x]
    assert 'proj.add' in line and '(2, 2)' in line


def test_show_decodes_one_dead_letter_in_full(run, dl):
    result = dl.cli(run, 'dead-letters', 'show', dl.task_dead_id, '--json')
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert (doc['dead_letter']['id'], doc['dead_letter']['task']) == (dl.task_dead_id, 'proj.add')
    assert (doc['args'], doc['kwargs']) == ([2, 2], {})
    assert doc['headers']['id'] == dl.task_id and doc['content_type'] == 'application/json'
    assert 'max_deliveries=1' in doc['record']['reason']
    text = dl.cli(run, 'dead-letters', 'show', dl.task_dead_id)
    assert text.exit_code == 0, text.output
    assert 'proj.add[%s]' % dl.task_id in text.output and '[2, 2]' in text.output
    junk = dl.cli(run, 'dead-letters', 'show', dl.junk_id)
    assert junk.exit_code == 0 and 'undecodable payload' in junk.output, junk.output
    missing = dl.cli(run, 'dead-letters', 'show', '1-1')
    assert missing.exit_code == 1 and "no dead letter '1-1'" in missing.output, missing.output



def test_list_json_describes_each_dead_letter(run, dl):
    result = dl.cli(run, 'dead-letters', 'list', '--json')
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert set(doc) == {'broker', 'global_keyprefix', 'namespace', 'limit', 'queues'}
    assert (doc['global_keyprefix'], doc['namespace'], doc['limit']) == (
        dl.prefix, dl.keys.prefix, 100)
    [queue] = doc['queues']
    assert set(queue) == {'name', 'stream', 'count', 'truncated', 'dead_letters'}
    assert (queue['name'], queue['stream'], queue['count'], queue['truncated']) == (
        'work', dl.dead, 2, False)
    junk, task = queue['dead_letters']
    assert set(task) == {'queue', 'id', 'age', 'reason', 'source_stream', 'source_id', 'task',
                         'task_id', 'args', 'kwargs', 'payload_size', 'deliveries', 'decodable',
                         'fields'}
    assert (task['args'], task['kwargs'], junk['args']) == ('(2, 2)', '{}', None)
    assert (junk['id'], task['id']) == (dl.junk_id, dl.task_dead_id)
    assert junk['reason'].startswith('undecodable entry') and junk['decodable'] is False
    assert (junk['task'], junk['task_id'], junk['payload_size'], junk['deliveries']) == (
        None, None, len(JUNK), None)
    assert (task['task'], task['task_id'], task['deliveries'], task['decodable']) == (
        'proj.add', dl.task_id, 1, True)
    assert task['payload_size'] == len(dl.task_payload.encode())
    assert 'max_deliveries=1' in task['reason']
    assert task['source_stream'] == junk['source_stream'] == dl.keys.stream('work')
    assert junk['source_id'] == dl.junk_source_id
    assert re.fullmatch(r'\d+-\d+', task['source_id'])   # the requeued entry's id
    assert set(task['fields']) == {'payload', 'deliveries', 'redelivered'}
    assert 0 <= task['age'] < 60

    limited = json.loads(dl.cli(run, 'dead-letters', 'list', '--json', '--limit', '1').output)
    [queue] = limited['queues']
    assert (queue['count'], queue['truncated'], len(queue['dead_letters'])) == (2, True, 1)
    assert queue['dead_letters'][0]['id'] == dl.junk_id   # the oldest first


def test_list_table(run, dl):
    result = dl.cli(run, 'dead-letters', 'list')
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "Queue 'work': 2 dead letters (%s)" % dl.dead in lines
    header = next(line for line in lines if line.strip().startswith('ID'))
    assert header.split() == ['ID', 'AGE', 'SOURCE', 'ID', 'TASK', 'TASK', 'ID', 'ARGS', 'SIZE', 'REASON']
    task_row = next(line for line in lines if line.strip().startswith('work/' + dl.task_dead_id))
    assert 'proj.add' in task_row and dl.task_id in task_row and 'max_deliveries=1' in task_row
    junk_row = next(line for line in lines if line.strip().startswith('work/' + dl.junk_id))
    assert 'undecodable entry' in junk_row and ' %d ' % len(JUNK) in junk_row

    result = dl.cli(run, 'dead-letters', 'list', '--limit', '1')
    assert '1 more (--limit 0 shows all)' in result.output and dl.task_dead_id not in result.output


def test_list_selects_queues(run, dl):
    with connection(dl.server, dl.prefix) as conn:
        work_queue('clean')(conn.default_channel).declare()
    doc = json.loads(dl.cli(run, 'dead-letters', 'list', '--json').output)
    assert [q['name'] for q in doc['queues']] == ['work']   # default: queues with dead letters
    doc = json.loads(dl.cli(run, 'dead-letters', 'list', '--json', '-Q', 'clean,work').output)
    assert [(q['name'], q['count']) for q in doc['queues']] == [('clean', 0), ('work', 2)]

    result = dl.cli(run, 'dead-letters', 'list', '-Q', 'nope')
    assert result.exit_code != 0 and "unknown queue 'nope'" in one_line(result)


def test_status_shows_the_dead_letter_count(run, dl):
    doc = json.loads(dl.cli(run, 'status', '--json').output)
    assert [(q['name'], q['dead_letters']) for q in doc['queues']] == [('work', 2)]
    row = next(line for line in dl.cli(run, 'status').output.splitlines() if line.startswith('work '))
    assert row.split()[-1] == '2'


# -- requeue ----------------------------------------------------------------------

def test_requeue_by_id_resets_the_delivery_count(run, dl):
    result = dl.cli(run, 'dead-letters', 'requeue', '--id', dl.task_dead_id, '-f')
    assert result.exit_code == 0, result.output
    [(new_id, fields)] = dl.redis.xrange(dl.keys.stream('work'))
    assert ("Requeued dead letter %s of queue 'work' to %s as %s: task proj.add[%s]"
            % (dl.task_dead_id, dl.keys.stream('work'), new_id, dl.task_id)) in result.output
    assert 'Total: 1 dead letter requeued from 1 queue.' in result.output
    assert 'deliveries' not in fields and fields['payload'] == dl.task_payload
    assert [i for i, _ in dl.redis.xrange(dl.dead)] == [dl.junk_id]   # the other one stays

    # with max_deliveries=1, a carried count would dead-letter it at once: it is delivered
    with connection(dl.server, dl.prefix, max_deliveries=1) as conn:
        [message] = consume(conn, work_queue(), until=lambda got: got, timeout=10, must=True)
    assert message.headers['task'] == 'proj.add' and message.headers['id'] == dl.task_id
    assert message.payload[0] == [2, 2]
    assert dl.redis.xlen(dl.dead) == 1 and dl.redis.xlen(dl.keys.stream('work')) == 0


def test_requeue_all_says_undecodable_ones_come_back(run, dl):
    result = dl.cli(run, 'dead-letters', 'requeue', '-f')
    assert result.exit_code == 0, result.output
    junk_line = next(line for line in result.output.splitlines() if dl.junk_id in line)
    assert junk_line.startswith('Requeued') and 'a worker will dead-letter it again' in junk_line
    assert 'Total: 2 dead letters requeued from 1 queue.' in result.output
    assert not dl.redis.exists(dl.dead) or dl.redis.xlen(dl.dead) == 0
    entries = [fields for _, fields in dl.redis.xrange(dl.keys.stream('work'))]
    assert [set(f) for f in entries] == [{'payload'}, {'payload', 'redelivered'}]

    with connection(dl.server, dl.prefix, max_deliveries=1) as conn:
        got = consume(conn, work_queue(), until=lambda got: got and dl.redis.xlen(dl.dead) == 1,
                      timeout=10, must=True)
    assert [m.headers['id'] for m in got] == [dl.task_id]
    [(_, dead)] = dl.redis.xrange(dl.dead)
    assert dead['reason'].startswith('undecodable entry')


def test_requeue_dry_run_says_what_it_would_do_and_changes_nothing(run, dl):
    before = snapshot(dl.redis, dl.prefix)
    result = dl.cli(run, 'dead-letters', 'requeue', '--dry-run')
    assert result.exit_code == 0, result.output
    assert ("Would requeue dead letter %s of queue 'work' to %s: task proj.add[%s]"
            % (dl.task_dead_id, dl.keys.stream('work'), dl.task_id)) in result.output
    assert ("Would requeue dead letter %s of queue 'work' to %s (undecodable payload: "
            "a worker will dead-letter it again)" % (dl.junk_id, dl.keys.stream('work'))) in result.output
    assert 'Total: 2 dead letters would be requeued from 1 queue.' in result.output
    assert 'Dry run: nothing was changed.' in result.output
    assert snapshot(dl.redis, dl.prefix) == before


def test_requeue_of_an_unknown_id_fails_in_one_line_and_changes_nothing(run, dl):
    before = snapshot(dl.redis, dl.prefix)
    for wrong, message in (('1-1', "no dead letter '1-1'"), ('junk', "not a dead-letter id: 'junk'")):
        result = dl.cli(run, 'dead-letters', 'requeue', '-f', '--id', dl.task_dead_id, '--id', wrong)
        assert result.exit_code == 1
        assert message in one_line(result)
    assert snapshot(dl.redis, dl.prefix) == before


def test_requeue_goes_back_to_the_priority_bucket_it_came_from(dl):
    bucket = dl.keys.stream('work', 6)
    dl.redis.xadd(bucket, {'payload': 'not json either'})
    with connection(dl.server, dl.prefix) as conn:
        consume(conn, work_queue(), until=lambda got: dl.redis.xlen(dl.dead) == 3, timeout=10, must=True)
    [letter] = [d for d in admin.dead_letters(dl.redis, global_keyprefix=dl.prefix)[0].dead_letters
                if d.source_stream == bucket]

    [item] = admin.requeue_dead_letters(dl.redis, global_keyprefix=dl.prefix, ids=[letter.id])

    assert (item.outcome, item.stream, item.fallback) == ('requeued', bucket, False)
    assert [i for i, _ in dl.redis.xrange(bucket)] == [item.new_id]


def test_requeue_never_writes_outside_the_queue_a_record_names(dl):
    """A dead letter whose record names no stream, or another key, goes to its queue's main stream."""
    foreign = dl.keys.stream('other')
    dl.redis.xadd(dl.dead, {'reason': 'old record', 'field:payload': '{}'})
    dl.redis.xadd(dl.dead, {'reason': 'odd record', 'stream': foreign, 'field:payload': '{}'})
    plan = admin.requeue_dead_letters(dl.redis, global_keyprefix=dl.prefix, dry_run=True)
    assert [(i.stream, i.fallback) for i in plan] == [(dl.keys.stream('work'), False)] * 2 + [
        (dl.keys.stream('work'), True)] * 2

    done = admin.requeue_dead_letters(dl.redis, global_keyprefix=dl.prefix)
    assert [i.outcome for i in done] == ['requeued'] * 4
    assert not dl.redis.exists(foreign) and dl.redis.xlen(dl.keys.stream('work')) == 4


def test_apply_requeue_skips_dead_letters_gone_meanwhile(dl):
    plan = admin.requeue_dead_letters(dl.redis, global_keyprefix=dl.prefix, dry_run=True)
    dl.redis.xdel(dl.dead, dl.junk_id)   # another operator got there first
    done = admin.apply_requeue(dl.redis, plan, global_keyprefix=dl.prefix)
    assert [(i.dead_letter.id, i.outcome) for i in done] == [
        (dl.junk_id, 'gone'), (dl.task_dead_id, 'requeued')]
    assert dl.redis.xlen(dl.keys.stream('work')) == 1


# -- purge ------------------------------------------------------------------------

def test_purge_dry_run_then_purge(run, dl):
    before = snapshot(dl.redis, dl.prefix)
    result = dl.cli(run, 'dead-letters', 'purge', '--dry-run')
    assert result.exit_code == 0, result.output
    assert "Would delete 2 dead letters of queue 'work' (%s)" % dl.dead in result.output
    assert 'Dry run: nothing was changed.' in result.output
    assert snapshot(dl.redis, dl.prefix) == before

    result = dl.cli(run, 'dead-letters', 'purge', '-f', '-Q', 'work')
    assert result.exit_code == 0, result.output
    assert "Deleted 2 dead letters of queue 'work'" in result.output
    assert not dl.redis.exists(dl.dead)
    assert dl.redis.xinfo_groups(dl.keys.stream('work'))   # the queue itself is untouched
    assert 'No dead letters.' in dl.cli(run, 'dead-letters', 'list').output
    assert 'nothing to purge' in dl.cli(run, 'dead-letters', 'purge', '-f').output
    assert 'nothing to requeue' in dl.cli(run, 'dead-letters', 'requeue', '-f').output


@pytest.mark.parametrize('command', ['requeue', 'purge'])
def test_without_a_terminal_or_force_nothing_happens(run, dl, command):
    before = snapshot(dl.redis, dl.prefix)
    result = dl.cli(run, 'dead-letters', command)
    assert result.exit_code == 1
    assert 'stdin is not a terminal' in one_line(result)
    assert snapshot(dl.redis, dl.prefix) == before


def test_help_lists_the_dead_letter_commands(run):
    result = run('streams', 'dead-letters', '--help')
    assert result.exit_code == 0
    for name in ('list', 'requeue', 'purge'):
        assert name in result.output
    assert '--id' in run('streams', 'dead-letters', 'requeue', '--help').output


def test_the_documented_acl_rules_are_enough(run, dl, redis_server, unique_name):
    dl.redis.execute_command('ACL', 'SETUSER', unique_name, 'reset', 'on', '>pw',
                             *admin.acl_rules(dl.prefix))
    try:
        url = redis_server.url_for(unique_name, 'pw')
        for args in (['list', '--json'], ['requeue', '-f', '--id', dl.task_dead_id], ['purge', '-f']):
            result = run('--broker', url, 'streams', '--prefix', dl.prefix, 'dead-letters', *args)
            assert result.exit_code == 0, result.output
        assert not dl.redis.exists(dl.dead) and dl.redis.xlen(dl.keys.stream('work')) == 1
    finally:
        dl.redis.acl_deluser(unique_name)


# -- ids in several queues -------------------------------------------------------

TWIN = '1700000000000-0'


@pytest.fixture
def twins(redis_server, prefix):
    """Queues ``a`` and ``b`` under ``prefix``, each with dead letters ``TWIN`` and ``1700000000000-1``:
    dead-letter ids are unique in one stream only (two workers dead-lettering at the same
    millisecond make the same id)."""
    client = redis_server.client(decode_responses=True)
    keys = Keys(prefix)
    for queue in ('a', 'b'):
        for entry_id in (TWIN, '1700000000000-1'):
            client.xadd(keys.dead_letters(queue), deadletters.record(
                queue, keys.stream(queue), '5-0', {'payload': '{"queue": "%s"}' % queue}, 'test'),
                id=entry_id)
    yield client, keys
    delete_keys(client, prefix)
    client.close()


def test_an_id_in_two_queues_is_named_with_its_queue(run, twins, redis_server, prefix):
    client, keys = twins

    def cli(*args):
        return run('--broker', streams_url(redis_server), 'streams', '--prefix', prefix,
                   'dead-letters', *args)

    listed = cli('list').output
    assert 'a/' + TWIN in listed and 'b/' + TWIN in listed   # the form `show` takes
    bare = cli('show', TWIN)
    assert bare.exit_code == 1
    assert one_line(bare) == (
        "Error: dead-letter id in several queues: %s (in queues 'a', 'b'); name the queue as "
        "QUEUE/ID (e.g. a/%s) or with -Q" % (TWIN, TWIN))
    for args, queue in (['b/' + TWIN], 'b'), (['-Q', 'b', TWIN], 'b'), (['a/' + TWIN], 'a'):
        shown = cli('show', *args, '--json')
        assert shown.exit_code == 0, shown.output
        doc = json.loads(shown.output)
        assert (doc['dead_letter']['queue'], doc['dead_letter']['id']) == (queue, TWIN)
        assert doc['record']['field:payload'] == '{"queue": "%s"}' % queue

    before = snapshot(client, prefix)
    refused = cli('requeue', '-f', '--id', TWIN)
    assert refused.exit_code == 1 and 'in several queues' in one_line(refused)
    both = cli('requeue', '-f', '--id', '1700000000000-1,%s' % TWIN)
    assert one_line(both).startswith('Error: dead-letter ids in several queues: 1700000000000-1 '
                                     "(in queues 'a', 'b'), %s (in queues 'a', 'b')" % TWIN)
    assert snapshot(client, prefix) == before

    done = cli('requeue', '-f', '--id', 'a/' + TWIN)
    assert done.exit_code == 0, done.output
    assert 'Total: 1 dead letter requeued from 1 queue.' in done.output
    assert [i for i, _ in client.xrange(keys.dead_letters('a'))] == ['1700000000000-1']
    assert [i for i, _ in client.xrange(keys.dead_letters('b'))] == [TWIN, '1700000000000-1']
    assert client.xlen(keys.stream('a')) == 1 and not client.exists(keys.stream('b'))

    # now TWIN is in b alone: the bare id is enough
    assert json.loads(cli('show', TWIN, '--json').output)['dead_letter']['queue'] == 'b'
    for wrong, message in (('a/' + TWIN, "no dead letter 'a/%s'" % TWIN),
                           ('/' + TWIN, 'not a dead-letter id'), ('a/', 'not a dead-letter id')):
        result = cli('show', wrong)
        assert result.exit_code == 1 and message in one_line(result), result.output


def test_many_ambiguous_ids_make_one_line(twins, prefix):
    client, keys = twins
    for n in range(2, 8):
        for queue in ('a', 'b'):
            client.xadd(keys.dead_letters(queue), {'reason': 'test'}, id='1700000000000-%d' % n)
    with pytest.raises(admin.AmbiguousDeadLetter) as raised:
        admin.requeue_dead_letters(client, global_keyprefix=prefix, dry_run=True,
                                   ids=['1700000000000-%d' % n for n in range(8)])
    assert str(raised.value).count('in queues') == 3 and 'and 5 more;' in str(raised.value)


# -- big and undecodable dead letters ---------------------------------------------

def celery_envelope(args, task_id='big-1'):
    """The payload kombu stores for a Celery task ``proj.big(*args)`` (protocol 2, base64 body)."""
    body = base64.b64encode(json.dumps([list(args), {}, {}]).encode()).decode()
    return json.dumps({'body': body, 'content-encoding': 'utf-8', 'content-type': 'application/json',
                       'headers': {'task': 'proj.big', 'id': task_id, 'argsrepr': repr(args)[:100],
                                   'kwargsrepr': '{}'},
                       'properties': {'body_encoding': 'base64', 'delivery_tag': 'x'}})


@pytest.fixture
def letters(redis_server, prefix, run):
    """``add(payload) -> QUEUE/ID`` of a new dead letter of queue ``big``; ``cli(*args)``."""
    client = redis_server.client()
    keys = Keys(prefix)

    def add(payload):
        fields = deadletters.record('big', keys.stream('big'), '5-0', {'payload': payload}, 'test')
        return 'big/' + client.xadd(keys.dead_letters('big'), fields).decode()

    def cli(*args):
        return run('--broker', streams_url(redis_server), 'streams', '--prefix', prefix,
                   'dead-letters', 'show', *args)
    yield add, cli
    delete_keys(client, prefix)
    client.close()


def test_show_cuts_a_big_dead_letter_and_says_how_to_get_it_all(letters):
    add, cli = letters
    payload = celery_envelope(['x' * 3_000_000])
    ref = add(payload)

    shown = cli(ref, '--json')
    assert shown.exit_code == 0
    assert len(shown.stdout) < 200_000, len(shown.stdout)
    assert shown.stderr == ('Note: 2 values cut (listed in "cut"); --full shows all, --raw writes '
                            "the payload's bytes.\n")
    doc = json.loads(shown.stdout)
    assert doc['cut'] == [{'what': 'record field:payload', 'size': len(payload), 'shown': 65536},
                          {'what': 'body', 'size': len(json.loads(payload)['body']), 'shown': 0}]
    assert doc['record']['field:payload'] == payload[:65536]
    assert (doc['headers']['task'], doc['body'], doc['args']) == ('proj.big', None, None)

    text = cli(ref)
    assert text.exit_code == 0 and len(text.output) < 10_000, text.output[:3000]
    assert ('cut  body: %d characters, not decoded (--full shows all, --raw writes the '
            'payload)' % len(json.loads(payload)['body'])) in [x.strip() for x in text.output.splitlines()]

    full = cli(ref, '--json', '--full')
    assert json.loads(full.output)['args'] == ['x' * 3_000_000] and not full.stderr
    raw = cli(ref, '--raw')
    assert raw.exit_code == 0 and raw.stdout_bytes == payload.encode()


def test_show_cuts_each_long_string_of_a_decoded_body(letters):
    add, cli = letters
    ref = add(celery_envelope(['y' * 100_000, 'short']))
    doc = json.loads(cli(ref, '--json').stdout)
    assert doc['args'] == ['y' * 65536, 'short']
    assert {'what': 'body[0][0]', 'size': 100_000, 'shown': 65536} in doc['cut']


def test_show_prints_an_undecodable_payload_escaped_and_cut(letters):
    add, cli = letters
    junk = cli(add(JUNK))
    assert junk.exit_code == 0
    assert ("payload  b'\\xff not json', 10 bytes: undecodable payload: a worker will "
            "dead-letter it again (--raw writes its bytes)") in [x.strip() for x in junk.output.splitlines()]
    long = bytes(range(256)) * 20
    shown = cli(add(long))
    [line] = [x.strip() for x in shown.output.splitlines() if x.strip().startswith('payload')]
    assert line.startswith("payload  %r..., 5120 bytes: undecodable" % long[:200])
    assert '\n' not in line and '\x00' not in line
    raw = cli(add(long), '--raw')
    assert raw.stdout_bytes == long
    both = cli(add(long), '--raw', '--json')
    assert both.exit_code == 1 and '--raw writes the payload alone' in one_line(both)
