"""How long other clients wait while a big queue is drained:
``python -m benchmarks drain-latency [--entries 1000000] [--pending N] [--step N]``.

Not part of CI. It starts a private ``redis-server`` (no persistence) on a free
port, fills one queue stream with ``--entries`` entries of ~300 bytes (a Lua
script, 10,000 per call) and delivers ``--pending`` of them (default half) to
one consumer of its group, so they sit in the PEL. Then it drains the stream
up to its last entry while a separate process PINGs the server on its own
connection about every millisecond, and reports PING p50 / p99 / max, the
drain time, the number of script calls and their server time (``SLOWLOG``:
p50, p99, max), for:

* **one-shot**: the ``drain`` script as it was before bounded steps (copied
  below, verbatim): one call trims the stream and acks its PEL;
* **bounded**: :meth:`celery_streams.scripts.Scripts.drain_stream`, what
  ``celery streams drain`` runs: calls of at most ``--step`` entries
  (default ``DRAIN_STEP``) until nothing is left.

The stream is filled afresh before each. Results are printed as markdown.
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ''):   # ``python benchmarks/drain_latency.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = 'benchmarks'

import redis  # noqa: E402

from benchmarks.common import RedisServer, body, percentile  # noqa: E402
from celery_streams.keys import Keys  # noqa: E402
from celery_streams.scripts import DRAIN_STEP, Scripts  # noqa: E402

GROUP = 'celery'
CONSUMER = 'bench@host:1:abcdef'
CHUNK = 10_000

#: celery_streams/scripts/drain.lua before bounded steps: one call does the whole stream.
ONE_SHOT_DRAIN = """
if redis.call('EXISTS', KEYS[1]) == 0 then
    return {0, 0}
end
local last = ARGV[1]
local removed
if last == '+' then
    removed = redis.call('XTRIM', KEYS[1], 'MAXLEN', 0)
else
    local ms, seq = string.match(last, '^(%d+)-(%d+)$')
    removed = redis.call('XTRIM', KEYS[1], 'MINID', ms .. '-' .. string.format('%d', tonumber(seq) + 1))
end
local cleared = 0
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if ARGV[2] == '1' and #groups == 0 and redis.call('XLEN', KEYS[1]) == 0 then
    redis.call('DEL', KEYS[1])
end
for _, group in ipairs(groups) do
    local name
    for i = 1, #group, 2 do
        if group[i] == 'name' then name = group[i + 1] end
    end
    while true do
        local pending = redis.call('XPENDING', KEYS[1], name, '-', last, 1000)
        if #pending == 0 then break end
        local ids = {}
        for i, item in ipairs(pending) do ids[i] = item[1] end
        cleared = cleared + redis.call('XACK', KEYS[1], name, unpack(ids))
    end
end
return {removed, cleared}
"""
FILL = """
local n, payload = tonumber(ARGV[1]), ARGV[2]
for i = 1, n do redis.call('XADD', KEYS[1], '*', 'payload', payload) end
return n
"""
READ = """
local got = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', tonumber(ARGV[3]),
                       'STREAMS', KEYS[1], '>')
if not got then return 0 end
return #got[1][2]
"""


def pinger(port, stop, results):
    """PING on a connection of its own about every millisecond until ``stop``; send the latencies."""
    client = redis.Redis(port=port)
    latencies = []
    while not stop.is_set():
        started = time.perf_counter()
        client.ping()
        latencies.append(time.perf_counter() - started)
        time.sleep(0.001)
    results.put(latencies)


def fill(client, stream, entries, pending):
    import json
    payload = json.dumps({'body': body(0), 'properties': {'delivery_info': {}}})
    client.xgroup_create(stream, GROUP, '0', mkstream=True)
    add, read = client.register_script(FILL), client.register_script(READ)
    for start in range(0, entries, CHUNK):
        add(keys=[stream], args=[min(CHUNK, entries - start), payload])
    done = 0
    while done < pending:
        done += read(keys=[stream], args=[GROUP, CONSUMER, min(CHUNK, pending - done)])
    return len(payload)


def measure(server, run):
    """Run ``run()`` while another process PINGs: (result, seconds, PING latencies, server
    time of each script call in µs, from ``SLOWLOG``)."""
    client = server.client()
    client.config_set('slowlog-log-slower-than', 0)
    client.config_set('slowlog-max-len', 1_000_000)
    client.slowlog_reset()
    ctx = multiprocessing.get_context('fork')
    stop, results = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=pinger, args=(server.port, stop, results), daemon=True)
    proc.start()
    time.sleep(0.3)
    started = time.perf_counter()
    result = run()
    elapsed = time.perf_counter() - started
    time.sleep(0.05)
    stop.set()
    latencies = results.get(timeout=30)
    proc.join(10)
    calls = [e['duration'] for e in client.slowlog_get(1_000_000)
             if e['command'].upper().startswith(b'EVAL')]
    client.config_set('slowlog-log-slower-than', 10_000)
    client.slowlog_reset()
    return result, elapsed, latencies, calls


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m benchmarks drain-latency',
                                     description=__doc__.split('\n')[0])
    parser.add_argument('--entries', type=int, default=1_000_000, help='stream entries (1,000,000)')
    parser.add_argument('--pending', type=int, help='entries delivered and not acked (default: half)')
    parser.add_argument('--step', type=int, default=DRAIN_STEP,
                        help='entries per bounded call (default DRAIN_STEP = %d)' % DRAIN_STEP)
    parser.add_argument('--server', default=shutil.which('redis-server') or 'redis-server',
                        help='redis-server (or valkey-server) binary')
    args = parser.parse_args(argv)
    pending = args.entries // 2 if args.pending is None else args.pending
    server = RedisServer(args.server).start()
    try:
        client = server.client()
        info = client.info('server')
        version = ('valkey %s' % info['valkey_version'] if 'valkey_version' in info
                   else 'redis %s' % info['redis_version'])
        stream = Keys('bench:').stream('drain')
        scripts = Scripts(client)
        one_shot = client.register_script(ONE_SHOT_DRAIN)
        for script in (one_shot, scripts.drain):   # loaded now: no NOSCRIPT round in the timing
            client.script_load(script.script)
        rows = []
        for name, drain in (
                ('one-shot script', lambda until: one_shot(keys=[stream], args=[until])),
                ('bounded, step %d' % args.step,
                 lambda until: scripts.drain_stream(stream, until, step=args.step))):
            client.delete(stream)
            started = time.perf_counter()
            size = fill(client, stream, args.entries, pending)
            until = client.xinfo_stream(stream)['last-generated-id'].decode()
            print('%s: filled %d entries (%d pending, payload %d bytes) in %.1f s, %s used'
                  % (name, args.entries, pending, size, time.perf_counter() - started,
                     client.info('memory')['used_memory_human']), flush=True)
            (removed, cleared), seconds, pings, calls = measure(
                server, lambda drain=drain, until=until: drain(until))
            assert (removed, cleared) == (args.entries, pending), (removed, cleared)
            assert client.xlen(stream) == 0 and client.xpending(stream, GROUP)['pending'] == 0
            rows.append((name, seconds, calls, pings))
            print('%s: %.2f s, %d call(s), PING max %.1f ms' % (name, seconds, len(calls),
                                                               max(pings) * 1000), flush=True)
            client.delete(stream)
        report(args, pending, version, rows)
    finally:
        server.stop()
    return 0


def report(args, pending, version, rows):
    with open('/proc/cpuinfo') as f:
        cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), '?')
    print()
    print('### Drain latency: %s entries, %s pending' % ('{:,}'.format(args.entries),
                                                         '{:,}'.format(pending)))
    print()
    print('`python -m benchmarks drain-latency --entries %d` on %s, %d cores (%s), %s; '
          'load average %.2f at the end.' % (args.entries, datetime.date.today().isoformat(),
                                             os.cpu_count(), cpu, version, os.getloadavg()[0]))
    print()
    print('| drain | time | script calls | call p50 / p99 / max (server) '
          '| PING p50 | PING p99 | PING max | PINGs |')
    print('|---|---|---|---|---|---|---|---|')
    for name, seconds, calls, pings in rows:
        print('| %s | %.2f s | %s | %s ms | %.2f ms | %.2f ms | %.1f ms | %s |' % (
            name, seconds, '{:,}'.format(len(calls)),
            ' / '.join('%.2f' % (v / 1000) for v in (percentile(calls, 50), percentile(calls, 99),
                                                     max(calls))),
            percentile(pings, 50) * 1000, percentile(pings, 99) * 1000, max(pings) * 1000,
            '{:,}'.format(len(pings))))
    print()


if __name__ == '__main__':
    sys.exit(main())
