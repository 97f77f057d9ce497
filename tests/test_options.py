"""Transport options: every check refuses in one line, every derived value is what it says (no server)."""
from __future__ import annotations

from dataclasses import fields

import pytest

from celery_streams.errors import ConfigurationError
from celery_streams.options import Options

#: Numbers of seconds above 0.
SECONDS = ['polling_interval', 'visibility_timeout', 'publish_wait_timeout', 'socket_timeout',
           'socket_connect_timeout']
#: Numbers of seconds, 0 included.
SECONDS_OR_ZERO = ['delayed_delivery_threshold', 'health_check_interval']
#: Whole numbers above 0.
POSITIVE_COUNTS = ['max_deliveries', 'dead_letter_maxlen', 'fanout_maxlen', 'max_connections']
#: Whole numbers, 0 included.
COUNTS = ['min_other_sentinels', 'publish_wait_replicas']
NUMERIC = SECONDS + SECONDS_OR_ZERO + POSITIVE_COUNTS + COUNTS

#: No number: NaN and the infinities in every spelling, booleans, text, containers.
NOT_NUMBERS = [float('nan'), 'nan', 'NaN', float('inf'), 'inf', '-inf', float('-inf'), 'infinity',
               '1e400', True, False, 'x', '', '1 second', [], {}, {'seconds': 1}]


def refusal(given) -> str:
    with pytest.raises(ConfigurationError) as info:
        Options.from_transport_options(given)
    message = str(info.value)
    assert '\n' not in message, message
    return message


def assert_refused(name, value):
    message = refusal({name: value})
    assert message.startswith('transport option %s must be ' % name), message
    assert message.endswith('not %r' % (value,)), message


def test_every_option_declares_its_check():
    unchecked = [f.name for f in fields(Options) if f.name != 'ignored' and 'check' not in f.metadata]
    assert unchecked == []
    numeric = {f.name for f in fields(Options) if f.type in ('float', 'int', 'float | None', 'int | None')}
    assert numeric == set(NUMERIC)


@pytest.mark.parametrize('name', NUMERIC)
@pytest.mark.parametrize('value', NOT_NUMBERS, ids=repr)
def test_a_numeric_option_refuses_what_is_no_finite_number(name, value):
    assert_refused(name, value)


@pytest.mark.parametrize('name', NUMERIC)
@pytest.mark.parametrize('value', [-1, -0.5, '-3'])
def test_a_numeric_option_refuses_a_negative_number(name, value):
    assert_refused(name, value)


@pytest.mark.parametrize('name', SECONDS + POSITIVE_COUNTS)
@pytest.mark.parametrize('value', [0, 0.0, '0'])
def test_zero_is_refused_where_the_option_must_be_positive(name, value):
    assert_refused(name, value)


@pytest.mark.parametrize('name', SECONDS_OR_ZERO + COUNTS)
def test_zero_is_accepted_where_it_means_off_or_none(name):
    assert getattr(Options.from_transport_options({name: '0'}), name) == 0


@pytest.mark.parametrize('name', POSITIVE_COUNTS + COUNTS)
@pytest.mark.parametrize('value', [2.5, '2.5', '3.0', 2 ** 63])
def test_a_count_refuses_a_fraction_and_what_redis_cannot_hold(name, value):
    assert_refused(name, value)


@pytest.mark.parametrize('name', SECONDS + SECONDS_OR_ZERO)
def test_seconds_refuse_what_no_redis_argument_or_socket_can_hold(name):
    assert_refused(name, 1e10)
    assert getattr(Options.from_transport_options({name: 1e9}), name) == 1e9


def test_numbers_given_as_text_are_converted():
    options = Options.from_transport_options({
        'polling_interval': '0.5', 'visibility_timeout': 30, 'max_deliveries': '3', 'fanout_maxlen': 5.0,
        'publish_wait_replicas': ' 2 ', 'socket_timeout': '2', 'health_check_interval': 0})
    assert (options.polling_interval, options.visibility_timeout) == (0.5, 30.0)
    assert isinstance(options.visibility_timeout, float)
    assert (options.max_deliveries, options.fanout_maxlen, options.publish_wait_replicas) == (3, 5, 2)
    assert all(isinstance(getattr(options, name), int)
               for name in ('max_deliveries', 'fanout_maxlen', 'publish_wait_replicas'))
    assert (options.socket_timeout, options.health_check_interval) == (2.0, 0.0)


@pytest.mark.parametrize('given, says', [
    ({'visibility_timeout': float('nan')},
     'visibility_timeout must be a positive number of seconds, not nan'),
    ({'visibility_timeout': 'inf'}, "visibility_timeout must be a positive number of seconds, not 'inf'"),
    ({'polling_interval': 'inf'}, "polling_interval must be a positive number of seconds, not 'inf'"),
    ({'publish_wait_timeout': float('inf')}, 'publish_wait_timeout must be a positive number of seconds'),
    ({'delayed_delivery_threshold': 'nan'},
     "delayed_delivery_threshold must be a number of seconds, 0 or more, not 'nan'"),
    ({'max_connections': True}, 'max_connections must be a positive number (an integer), not True'),
    ({'publish_wait_replicas': True}, 'publish_wait_replicas must be a whole number, 0 or more, not True'),
    ({'max_deliveries': 2.5}, 'max_deliveries must be a positive number (an integer), not 2.5'),
])
def test_the_message_names_the_option_the_value_and_what_is_expected(given, says):
    message = refusal(given)
    assert message.startswith('transport option ') and says in message, message


@pytest.mark.parametrize('name', ['socket_timeout', 'socket_connect_timeout', 'socket_keepalive',
                                  'socket_keepalive_options', 'retry_on_timeout', 'client_name',
                                  'master_name', 'sentinel_kwargs', 'min_other_sentinels'])
def test_none_is_accepted_where_it_is_the_default(name):
    assert getattr(Options.from_transport_options({name: None}), name) is None


@pytest.mark.parametrize('name', ['polling_interval', 'max_deliveries', 'delayed_delivery',
                                  'consumer_group', 'global_keyprefix', 'priority_steps',
                                  'publish_confirm', 'health_check_interval'])
def test_none_is_refused_where_the_option_has_a_value(name):
    assert_refused(name, None)


@pytest.mark.parametrize('name', ['delayed_delivery', 'socket_keepalive', 'retry_on_timeout'])
@pytest.mark.parametrize('value', ['maybe', 2, 1.0, float('nan'), 'nan', []], ids=repr)
def test_a_flag_refuses_what_is_not_true_or_false(name, value):
    assert_refused(name, value)


@pytest.mark.parametrize('value, meant', [(True, True), ('off', False), ('Yes', True), (0, False)])
def test_a_flag_takes_the_spellings_of_a_configuration_file(value, meant):
    assert Options.from_transport_options({'retry_on_timeout': value}).retry_on_timeout is meant


@pytest.mark.parametrize('given', [
    {'global_keyprefix': 5}, {'client_name': b'w1'}, {'consumer_group': ''}, {'consumer_group': 7},
    {'master_name': ''}, {'sentinel_kwargs': 'password'}, {'socket_keepalive_options': [1, 2]},
    {'queue_order_strategy': 'random'}, {'priority_semantics': 'RabbitMQ'}, {'publish_confirm': 'never'},
    {'priority_steps': [0, 2.5]}, {'priority_steps': [True, 0]}, {'priority_steps': [0, float('nan')]},
    {'priority_steps': [0, 'inf']},
])
def test_other_options_refuse_in_one_line(given):
    [(name, value)] = given.items()
    assert_refused(name, value)


def test_an_unknown_name_gets_the_closest_known_one():
    message = refusal({'visibilty_timeout': 5, 'polling_intervall': 1})
    assert message.startswith("unknown transport option(s) 'polling_intervall' (did you mean "
                              "'polling_interval'?), 'visibilty_timeout' (did you mean "
                              "'visibility_timeout'?) for celery_streams; its ")
    assert message.endswith(" options are listed in docs/configuration.md (the docstring of "
                            "celery_streams.options)")
    assert 'ignored' not in message and 'socket_timeout' not in message   # no list of every name


def test_checks_together():
    assert "publish_wait_replicas needs publish_confirm='now'" in refusal(
        {'publish_confirm': 'later', 'publish_wait_replicas': 1})
    assert Options.from_transport_options({'publish_confirm': 'later', 'publish_wait_replicas': 0})


# -- derived values ---------------------------------------------------------------------------

def derived(options: Options) -> dict:
    return {name: getattr(options, name) for name in (
        'visibility_ms', 'renew_every', 'reclaim_every', 'healed_mark_ms', 'orphan_expiry_ms',
        'idle_consumer_ms', 'block_ms', 'bucket_order', 'publish_wait_ms',
        'delayed_delivery_threshold_ms')}


def test_derived_values_of_the_defaults():
    assert derived(Options()) == derived(Options.from_transport_options({})) == {
        'visibility_ms': 300_000, 'renew_every': 60.0, 'reclaim_every': 60.0,
        'healed_mark_ms': 300_000, 'orphan_expiry_ms': 300_000, 'idle_consumer_ms': 7_000,
        'block_ms': 1_000, 'bucket_order': (0, 3, 6, 9), 'publish_wait_ms': 1_000,
        'delayed_delivery_threshold_ms': 1_000.0}


@pytest.mark.parametrize('given, expected', [
    ({'visibility_timeout': 30, 'polling_interval': 2.5},
     {'visibility_ms': 30_000, 'renew_every': 10.0, 'reclaim_every': 7.5, 'healed_mark_ms': 30_000,
      'orphan_expiry_ms': 30_000, 'idle_consumer_ms': 10_000, 'block_ms': 2_500}),
    # short: renewals and reclaims have a floor, a broadcast queue's expiry too
    ({'visibility_timeout': '0.3', 'polling_interval': 0.0004},
     {'visibility_ms': 300, 'renew_every': 0.2, 'reclaim_every': 0.5, 'healed_mark_ms': 300,
      'orphan_expiry_ms': 10_000, 'idle_consumer_ms': 5_000, 'block_ms': 1}),   # never BLOCK 0
    ({'visibility_timeout': 0.0004}, {'visibility_ms': 1, 'healed_mark_ms': 1}),   # never PX 0
    ({'visibility_timeout': 3600},
     {'visibility_ms': 3_600_000, 'renew_every': 60.0, 'reclaim_every': 60.0, 'orphan_expiry_ms': 3_600_000}),
    ({'priority_steps': [9, 0, 5], 'priority_semantics': 'rabbitmq'}, {'bucket_order': (9, 5, 0)}),
    ({'priority_steps': ['9', 0, 5], 'priority_semantics': 'kombu'}, {'bucket_order': (0, 5, 9)}),
    ({'publish_wait_timeout': 0.25, 'delayed_delivery_threshold': 2.5},
     {'publish_wait_ms': 250, 'delayed_delivery_threshold_ms': 2_500.0}),
    ({'publish_wait_timeout': 0.0004, 'delayed_delivery_threshold': 0},   # never WAIT 0
     {'publish_wait_ms': 1, 'delayed_delivery_threshold_ms': 0.0}),
])
def test_derived_values_of_settings(given, expected):
    values = derived(Options.from_transport_options(given))
    assert {name: values[name] for name in expected} == expected
