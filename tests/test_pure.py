"""Tests of pure code: no server is started or reached, so these run where no
Redis/Valkey binary is installed (see ``tests/conftest.py``).

Transport options, the key schema, delivery tags, RESP packing, and broker URLs.
"""
from __future__ import annotations

import ssl

import kombu
import pytest
import redis
from kombu import Connection

import celery_streams  # noqa: F401  (registers redis-streams://)
from celery_streams import admin, errors, wire
from celery_streams.connection import Address, database, first_url, safe_url
from celery_streams.keys import Keys, acl_rules, binding_member, glob_escape, parse_binding
from celery_streams.options import Options
from celery_streams.qos import Tag, make_tag, parse_tag
from tests.helpers import port_url
from tests.servers import free_port


def nowhere():
    """A ``redis-streams://`` URL of a loopback port nothing listens on."""
    return port_url(free_port())


# -- transport options ----------------------------------------------------------

def test_unknown_transport_option_fails_in_one_line():
    with pytest.raises(errors.ConfigurationError) as info:
        Connection(nowhere(), transport_options={'visibilty_timeout': 5}).connect()
    assert "'visibilty_timeout'" in str(info.value) and '\n' not in str(info.value)


def test_sentinel_options_are_refused_without_a_sentinel_url_in_one_line():
    with pytest.raises(errors.ConfigurationError) as info:
        Connection(nowhere(), transport_options={'master_name': 'mymaster',
                                                 'sentinel_kwargs': {}}).connect()
    message = str(info.value)
    assert message.startswith('transport option(s) master_name, sentinel_kwargs apply to Redis '
                              'Sentinel only') and 'sentinel-streams://' in message
    assert '\n' not in message


def test_a_sentinel_url_needs_master_name_in_one_line():
    with pytest.raises(errors.ConfigurationError) as info:
        Connection('sentinel-streams://127.0.0.1:%d' % free_port()).connect()
    assert 'needs the transport option master_name' in str(info.value) and '\n' not in str(info.value)


@pytest.mark.parametrize('url', [
    'sentinel-streams://127.0.0.1:1;redis-streams://127.0.0.1:2',
    'redis-streams://127.0.0.1:1;sentinel-streams://127.0.0.1:2',
])
def test_sentinel_and_redis_urls_do_not_mix(url):
    with pytest.raises(errors.ConfigurationError, match='mix sentinel-streams://'):
        Connection(url, transport_options={'master_name': 'm'}).connect()
    with pytest.raises(errors.ConfigurationError, match='mix sentinel-streams://'):
        admin.client_from_url(url, transport_options={'master_name': 'm'})


def test_a_sentinel_url_lists_every_sentinel_and_the_masters_database():
    options = Options.from_transport_options({'master_name': 'm'})
    url = 'sentinel-streams://:pw@s1:5000/3;sentinel-streams://s2;sentinel-streams://s3:5002/3'
    from_url = Address.from_url(url, options=options)
    assert from_url == Address.from_kombu(Connection(url), options)
    assert from_url.sentinels == (('s1', 5000), ('s2', 26379), ('s3', 5002))
    assert (from_url.db, from_url.password, from_url.tls) == (3, 'pw', False)
    assert Address.from_url(url.split(';')) == from_url                       # a list, as Celery allows
    assert Address.from_url('sentinel-streams://h').sentinels == (('h', 26379),)
    assert 'pw' not in from_url.where and 's2:26379' in from_url.where
    with pytest.raises(errors.ConfigurationError, match='TLS is not supported'):
        Address.from_url('sentinel-streams://h', ssl=True, options=options)


def test_a_cluster_url_lists_every_seed_with_the_first_urls_credentials_and_tls():
    url = 'rediss-streams+cluster://u:p%40w@h1:7000,h2,[::1]:7002/0?ssl_cert_reqs=none'
    address = Address.from_url(url)
    assert address.cluster and address.seeds == (('h1', 7000), ('h2', 6379), ('::1', 7002))
    assert (address.host, address.port, address.db) == ('h1', 7000, 0)
    assert (address.username, address.password, address.tls) == ('u', 'p@w', True)
    assert address.ssl == {'ssl_cert_reqs': ssl.CERT_NONE}
    assert 'p@w' not in address.where and 'h2:6379' in address.where
    split = 'redis-streams+cluster://:pw@h1:7000;redis-streams+cluster://h2:7001'
    assert Address.from_url(split).seeds == Address.from_url(split.split(';')).seeds == (
        ('h1', 7000), ('h2', 7001))
    assert (Address.from_url(split).password, Address.from_url(split).tls) == ('pw', False)
    assert Address.from_url('redis-streams+cluster://h1', ssl=True).tls


def test_the_transport_reads_a_cluster_url_in_every_form_kombu_passes_it():
    """kombu reads ``redis-streams+cluster://h1,h2`` as transport ``redis-streams`` with host
    ``cluster://h1,h2`` (and a ``;`` list as alternates): the transport finds the seeds."""
    for url, seeds in (('redis-streams+cluster://:pw@h1:7000,h2:7001', (('h1', 7000), ('h2', 7001))),
                       ('redis-streams+cluster://h1;redis-streams+cluster://h2:7002',
                        (('h1', 6379), ('h2', 7002))),
                       ('rediss-streams+cluster://h1', (('h1', 6379),))):
        connection = Connection(url)
        address = Address.from_kombu(connection, Options.from_transport_options({}))
        assert (address.cluster, address.seeds) == (True, seeds)
        assert address.tls == url.startswith('rediss')
        # Celery prints it (worker banner): kombu's URL parser takes the seed list for a bad port
        assert connection.as_uri().startswith(url.split(';')[0].replace(':pw@', ':**@')[:20])
    assert Connection('redis-streams+cluster://:pw@h1:7000,h2:7001').as_uri() == \
        'redis-streams+cluster://:**@h1:7000,h2:7001'
    with pytest.raises(ValueError, match='no single connection pool'):
        Address.from_url('redis-streams+cluster://h1').pool(Options.from_transport_options({}))


def test_options_a_cluster_cannot_honour_are_refused_in_one_line():
    for url, options, says in (
            ('redis-streams+cluster://h1', {'publish_wait_replicas': 1},
             'publish_wait_replicas is not supported on a Redis Cluster'),
            ('redis-streams+cluster://h1/2', {}, 'a Redis Cluster has database 0 only'),
            ('redis-streams+cluster://h1', {'master_name': 'm'}, 'apply to Redis Sentinel only')):
        with pytest.raises(errors.ConfigurationError) as refused:
            Connection(url, transport_options=options).connect()
        assert says in str(refused.value) and '\n' not in str(refused.value)


def test_a_sentinel_pool_follows_the_master_with_the_given_options():
    from redis.sentinel import SentinelConnectionPool
    options = Options.from_transport_options({
        'master_name': 'm', 'socket_timeout': 2, 'min_other_sentinels': 1,
        'sentinel_kwargs': {'password': 'sentinel-secret'}})
    pool = Address.from_url('sentinel-streams://:pw@s1:5000/3;sentinel-streams://s2',
                            options=options).pool(options, max_connections=1)
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == 'm'
    assert pool.max_connections == 1
    kwargs = pool.connection_kwargs
    assert (kwargs['db'], kwargs['password'], kwargs['socket_timeout']) == (3, 'pw', 2)
    assert 'host' not in kwargs and 'port' not in kwargs
    manager = pool.sentinel_manager
    assert manager.min_other_sentinels == 1
    assert [(c.connection_pool.connection_kwargs['host'], c.connection_pool.connection_kwargs['port'])
            for c in manager.sentinels] == [('s1', 5000), ('s2', 26379)]
    sentinel_kwargs = manager.sentinels[0].connection_pool.connection_kwargs
    assert sentinel_kwargs['password'] == 'sentinel-secret' and sentinel_kwargs['socket_timeout'] == 2
    assert sentinel_kwargs['socket_connect_timeout'] == 5.0
    pool.disconnect()


def test_the_sentinel_scheme_selects_this_transport():
    from celery_streams.transport import Transport
    assert Connection('sentinel-streams://h', transport_options={'master_name': 'm'}
                      ).transport_cls == 'sentinel-streams'
    assert kombu.transport.resolve_transport('sentinel-streams') is Transport


def test_plain_redis_failover_url_is_refused():
    url = nowhere() + ';redis://127.0.0.1:1/0'
    with pytest.raises(errors.ConfigurationError, match='redis-streams://'):
        Connection(url).connect()


def test_bad_database_in_url():
    url = 'redis-streams://127.0.0.1:%d/notanumber' % free_port()
    with pytest.raises(errors.ConfigurationError, match='database'):
        Connection(url).connect()


def test_options_defaults_and_conversions():
    assert Options.from_transport_options(None) == Options()
    options = Options.from_transport_options({
        'visibility_timeout': '5', 'max_deliveries': '3', 'priority_steps': [9, 0, 3, 3],
        'ack_emulation': True,   # kombu's Redis transport's: accepted, ignored
        'max_retries': 3,        # kombu's own
    })
    assert (options.visibility_timeout, options.max_deliveries) == (5.0, 3)
    assert options.priority_steps == (0, 3, 9)
    assert options.ignored == ('ack_emulation',)
    assert Options().priority_steps == (0, 3, 6, 9) and Options().consumer_group == 'celery'


@pytest.mark.parametrize('given, message', [
    ({'visibilty_timeout': 5}, "unknown transport option(s) 'visibilty_timeout'"),
    ({'master_name': ''}, 'master_name must be the name the Sentinels monitor'),
    ({'sentinel_kwargs': 'password'}, 'sentinel_kwargs must be a dict'),
    ({'min_other_sentinels': -1}, 'min_other_sentinels must be a whole number'),
    ({'publish_wait_replicas': 1.5}, 'publish_wait_replicas must be a whole number'),
    ({'publish_wait_timeout': 0}, 'publish_wait_timeout must be a positive number'),
    ({'visibility_timeout': 0}, 'visibility_timeout must be a positive number'),
    ({'max_deliveries': 'x'}, 'max_deliveries must be a positive number'),
    ({'consumer_group': ''}, 'consumer_group must be a non-empty string'),
    ({'queue_order_strategy': 'random'}, 'queue_order_strategy must be one of'),
    ({'priority_semantics': 'x'}, 'priority_semantics must be one of'),
    ({'priority_steps': [1, 5]}, 'priority_steps must be numbers from 0 to 9 starting at 0'),
    ({'priority_steps': [0, 12]}, 'priority_steps must be numbers from 0 to 9 starting at 0'),
    ({'priority_steps': 'ab'}, 'priority_steps must be numbers from 0 to 9 starting at 0'),
])
def test_bad_options_fail_in_one_line(given, message):
    with pytest.raises(errors.ConfigurationError) as info:
        Options.from_transport_options(given)
    assert message in str(info.value) and '\n' not in str(info.value)


# -- the key schema -------------------------------------------------------------

def test_keys_helpers_round_trip():
    keys = Keys('p:')
    assert keys.parse(keys.stream('a:b')) == ('a:b', 'stream', 0)
    assert keys.parse(keys.stream('a}:b', 6)) == ('a}:b', 'stream', 6)
    assert keys.parse(keys.dead_letters('a')) == ('a', 'dead', None)
    assert keys.parse(keys.alive('a', 'host:1:x')) == ('a', 'alive', 'host:1:x')
    assert keys.parse(keys.queues) is None


def test_keys_building_and_parsing():
    keys = Keys('p*[x]:')
    assert keys.stream('q') == 'p*[x]:celery-streams:q:{q}'
    assert keys.streams('q') == [keys.stream('q', bucket) for bucket in (0, 3, 6, 9)]
    assert Keys('p:', priority_steps=[5, 0]).streams('q') == ['p:celery-streams:q:{q}',
                                                              'p:celery-streams:q:{q}:p5']
    assert keys.parse_stream(keys.stream('q', 9)) == ('q', 9)
    with pytest.raises(ValueError):
        keys.parse_stream(keys.dead_letters('q'))
    assert keys.parse_bindings(keys.bindings('e')) == 'e'
    assert keys.parse_bindings(keys.queues) is None
    # SCAN patterns escape the prefix's glob characters
    assert keys.match_all == 'p\\*\\[x\\]:celery-streams:*'
    assert glob_escape('a*b?[c]\\') == 'a\\*b\\?\\[c\\]\\\\'
    assert acl_rules('p:')[:2] == ['~p:celery-streams:*', '-@all']


def test_bindings_round_trip():
    member = binding_member('rk', 'pat', 'q')
    assert parse_binding(member) == parse_binding(member.encode()) == ('rk', 'pat', 'q')
    assert parse_binding(binding_member('', '', 'q')) == ('', '', 'q')


# -- delivery tags --------------------------------------------------------------

@pytest.mark.parametrize('entry_id, consumer, queue, bucket', [
    ('1700000000000-0', 'host:123:ab12cd', 'celery', 0),
    ('1-5', 'h:1:x', 'a/b/c', 6),         # the queue, last, may hold slashes
    ('2-0', 'h:1:x', 'reply.celery.pidbox', 9),
])
def test_delivery_tags_round_trip(entry_id, consumer, queue, bucket):
    tag = make_tag(entry_id, consumer, queue, bucket)
    assert parse_tag(tag) == Tag(entry_id, consumer, bucket, queue)
    assert make_tag(entry_id, consumer, queue) == '%s/%s/0/%s' % (entry_id, consumer, queue)


# -- RESP packing ---------------------------------------------------------------

def test_wire_pack_writes_resp_like_redis_py():
    args = ['XADD', 'k', '*', 'payload', b'\x00\xff', 5, '\u00e9']
    packed = wire.pack(args)
    assert packed == (b'*7\r\n$4\r\nXADD\r\n$1\r\nk\r\n$1\r\n*\r\n$7\r\npayload\r\n'
                      b'$2\r\n\x00\xff\r\n$1\r\n5\r\n$2\r\n\xc3\xa9\r\n')
    assert packed == b''.join(redis.Connection().pack_command(*args))   # no connection made
    assert wire.pack([]) == b'*0\r\n'
    assert wire.text(b'abc') == 'abc' and wire.text(3) == 3


# -- broker URLs ----------------------------------------------------------------

@pytest.mark.parametrize('url', ['redis://h:6379/0/', 'redis://h:6379/0', 'redis://h:6379/', 'redis://h:6379'])
def test_database_zero_with_or_without_a_trailing_slash(url):
    assert Address.from_url(url).db == 0
    assert Address.from_kombu(kombu.Connection(url)).db == 0


def test_address_from_url_and_from_kombu_agree():
    url = 'redis-streams://u:pw@h:7000/3'
    assert Address.from_url(url) == Address.from_kombu(kombu.Connection(url)) == Address(
        host='h', port=7000, db=3, username='u', password='pw')
    assert Address.from_url('redis://') == Address(host='127.0.0.1', port=6379, db=0)
    assert Address.from_kombu(kombu.Connection('rediss-streams://h:6380/5')).tls is True


def test_address_tls_and_ssl_arguments():
    tls = Address.from_url('rediss-streams://u:p%40ss@h/2?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem')
    assert (tls.host, tls.port, tls.db, tls.username, tls.password, tls.tls) == (
        'h', 6379, 2, 'u', 'p@ss', True)
    assert tls.ssl['ssl_ca_certs'] == '/ca.pem'
    assert Address.from_url('redis://h:1/0', ssl=True).tls is True
    assert Address.from_url('redis://h:1/0', ssl={'ssl_cert_reqs': 'none'}).ssl == {'ssl_cert_reqs': 'none'}
    with pytest.raises(errors.ConfigurationError, match='broker_use_ssl'):
        Address.from_url('redis://h:1/0', ssl={'cert_reqs': 'none'})


@pytest.mark.parametrize('url, message', [
    ('amqp://guest:secret@localhost//', 'is not a Redis URL'),
    ('redis://localhost:6379/zero', 'the database in a redis URL is a number'),
    ('nourl', 'not a broker URL'),
    ('redis://h:port/0', 'cannot parse broker URL'),
    ('redis-streams+cluster://h1/2', 'database 0 only'),
    ('redis-streams+cluster://h1:7000,h2:x', "seed node 'h2:x'"),
    ('redis-streams+cluster://h1,,h2', "seed node ''"),
    ('redis-streams+cluster://h1;redis-streams://h2', 'mix redis-streams+cluster://'),
    ('redis-streams+cluster://h1;sentinel-streams://h2', 'mix sentinel-streams://'),
])
def test_address_refuses_bad_urls_in_one_line(url, message):
    with pytest.raises(errors.ConfigurationError) as info:
        Address.from_url(url)
    assert message in str(info.value) and 'secret' not in str(info.value)
    assert '\n' not in str(info.value)


def test_database_and_url_helpers():
    assert [database(v) for v in (None, '', '/', '0', '/0', '/0/', '/3', 3)] == [0, 0, 0, 0, 0, 0, 3, 3]
    with pytest.raises(errors.ConfigurationError, match='database'):
        database('notanumber')
    assert safe_url('redis://user:secret@h:1/0') == 'redis://user:**@h:1/0'
    assert safe_url('redis://u:secret@h:notaport/0') == 'redis://u:**@h:notaport/0'
    assert first_url('a;b') == 'a' and first_url(' a ; b') == 'a'
    assert first_url(['x', 'y']) == 'x' and first_url([]) is None and first_url(None) is None


def test_client_refuses_other_urls():
    with pytest.raises(errors.ConfigurationError, match='not a Redis URL'):
        admin.client_from_url('amqp://guest:secret@localhost//')
    with pytest.raises(errors.ConfigurationError, match='database'):
        admin.client_from_url('redis://localhost:6379/zero')
    assert 'secret' not in admin.safe_url('redis://user:secret@localhost:1/0')
