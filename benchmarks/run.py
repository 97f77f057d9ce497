"""Run the benchmarks: ``python -m benchmarks [--quick] [--only NAME[,NAME]]``.

celery_streams, kombu's Redis transport (same private Redis) and RabbitMQ
(when it answers) run each workload in turn, round after round (a, b, c, a, b,
c, ...). Medians are printed and written as markdown to ``--output``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ''):   # ``python benchmarks/run.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = 'benchmarks'

from benchmarks import celery_workloads as cw  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks import kombu_workloads as kw  # noqa: E402
from benchmarks.common import (KOMBU_REDIS, ROOT, STREAMS, RedisServer, alternate,  # noqa: E402
                               machine_info, make_brokers, median, rabbit_version,
                               snapshot_sources, sources_digest, with_confirm_later)

SIZES = {
    #                 full       quick
    'rounds':        (3,         2),        # kombu workloads
    'celery_rounds': (3,         1),        # Celery throughput and latency
    'scaling_rounds': (2,        1),        # queues, workers
    'messages':      (20_000,    5_000),    # publish, batch, consume, queues
    'tasks':         (10_000,    2_000),    # Celery throughput, workers
    'latency_s':     (10,        3),
    'backlog':       (1_000_000, 100_000),
    'backlog_slice': (100_000,   25_000),
}
LATENCY_RATES = (50, 500)
WORKLOADS = ('publish', 'batch', 'consume', 'celery', 'latency', 'queues', 'backlog', 'workers',
             'profile')


class Bench:
    def __init__(self, args):
        self.quick = args.quick
        self.size = {k: v[1 if args.quick else 0] for k, v in SIZES.items()}
        if args.rounds:
            for key in ('rounds', 'celery_rounds', 'scaling_rounds'):
                self.size[key] = args.rounds
        self.lines = []
        self.started = time.monotonic()
        self.e2e = None   # the 1-worker throughput, reused by the workers scaling

    def log(self, text=''):
        print('[%4.0fs] %s' % (time.monotonic() - self.started, text), flush=True)

    def emit(self, text=''):
        """A markdown line of the report (also printed)."""
        self.lines.append(text)
        print(text, flush=True)

    def compare(self, title, rows, brokers, unit, higher_is_better=True, note=None):
        """A table of medians per broker and the ratio to kombu's Redis transport."""
        names = [b.name for b in brokers]
        others = [n for n in names if n != KOMBU_REDIS]
        self.emit('### ' + title)
        self.emit()
        if note:
            self.emit(note)
            self.emit()
        head = ['workload'] + ['%s (%s)' % (n, unit) for n in names]
        head += ['%s / kombu redis' % n for n in others]
        self.emit('| ' + ' | '.join(head) + ' |')
        self.emit('|' + '---|' * len(head))
        for label, results in rows:
            meds = {n: median(results.get(n, [])) for n in names}
            cells = [label] + [_cell(meds[n], results.get(n, [])) for n in names]
            for n in others:
                base = meds.get(KOMBU_REDIS)
                ratio = meds[n] / base if base and base == base and meds[n] == meds[n] else None
                cells.append('-' if ratio is None else '**%.2f×**' % ratio)
            self.emit('| ' + ' | '.join(cells) + ' |')
        self.emit()
        if not higher_is_better:
            self.emit('(lower is better: a ratio below 1 means faster than kombu redis)')
            self.emit()

    def work(self, title, rows, brokers, note):
        """Redis server CPU and commands per message, for the brokers that are the private Redis."""
        names = [b.name for b in brokers if b.on_redis]
        if not names or not any(runs and 'cpu_us' in runs[0] for _, res in rows for runs in res.values()):
            return
        self.emit('Redis server work per message — ' + title + ' (' + note + '):')
        self.emit()
        self.emit('| workload | ' + ' | '.join(names) + ' |')
        self.emit('|---|' + '---|' * len(names))
        for label, res in rows:
            cells = []
            for name in names:
                runs = [r for r in res.get(name, []) if 'cpu_us' in r]
                if not runs:
                    cells.append('-')
                    continue
                cmds = ', '.join('%s %s' % (c, _num(v)) for c, v in list(runs[-1]['cmds'].items())[:6])
                cells.append('%s µs CPU; %s' % (_num(median([r['cpu_us'] for r in runs])), cmds))
            self.emit('| %s | %s |' % (label.split(' (')[0], ' | '.join(cells)))
        self.emit()


def _cell(value, runs):
    if not runs:
        return '-'   # not run for this broker
    if value != value:   # NaN: no successful run
        return 'failed'
    text = _num(value)
    if len(runs) > 1:
        text += ' <sub>(%s–%s)</sub>' % (_num(min(runs)), _num(max(runs)))
    return text


def _num(value):
    return '{:,.0f}'.format(value) if value >= 100 else '{:.3g}'.format(value)


def pick(results, field):
    return {name: [r[field] for r in runs] for name, runs in results.items()}


def run_kombu(bench, brokers, only):
    n, rounds = bench.size['messages'], bench.size['rounds']
    rows = []
    publishers = with_confirm_later(brokers)
    if 'publish' in only:
        bench.log('== kombu publish, %d messages, 1 queue' % n)
        rows.append(('publish (msg/s)', alternate(
            publishers, rounds, bench.log, lambda b: kw.run_publish(b, n))))
        bench.log('== Celery send_task one by one, %d tasks' % n)
        rows.append(('Celery send_task, one by one (tasks/s)', alternate(
            publishers, rounds, bench.log, lambda b: cw.run_send(b, n))))
    if 'batch' in only:
        bench.log('== kombu Producer.batch() publish, %d messages' % n)
        res = alternate(publishers, rounds, bench.log, lambda b: kw.run_publish(b, n, batch=True))
        batched = {name: runs[0]['batched'] for name, runs in res.items() if runs}
        label = 'publish in Producer.batch() (msg/s; pipelined: %s)' % ', '.join(
            '%s %s' % (name, 'yes' if flag else 'no') for name, flag in batched.items())
        rows.append((label, res))
    if 'consume' in only:
        bench.log('== kombu consume+ack, %d messages, prefetch %d' % (n, kw.PREFETCH))
        rows.append(('consume + ack, prefetch %d (msg/s)' % kw.PREFETCH, alternate(
            brokers, rounds, bench.log, lambda b: kw.run_consume(b, n))))
    if rows:
        shown = publishers if {'publish', 'batch'} & only else brokers
        bench.compare('kombu: publish and consume', [(label, pick(res, 'rate')) for label, res in rows],
                      shown, 'msg/s', note=(
            '%d JSON messages of ~300 bytes, one queue behind a direct exchange (as Celery '
            'declares them); publish timed until the broker reports all of them queued; consume '
            'drains a pre-filled queue with one Consumer, acking each message.' % n))
        bench.work('kombu', rows, shown, 'the timed part; commands: calls per message')


def run_queues(bench, brokers):
    n, rounds = bench.size['messages'] // 2, bench.size['scaling_rounds']
    rows = []
    for count in (1, 10, 100):
        bench.log('== consume+ack from %d queues, %d messages' % (count, n))
        res = pick(alternate(brokers, rounds, bench.log,
                             lambda b, count=count: kw.run_consume(b, n, queue_count=count)), 'rate')
        rows.append(('%d queue%s (msg/s)' % (count, 's' if count > 1 else ''), res))
    bench.compare('Scaling: queues consumed by one Consumer', rows, brokers, 'msg/s', note=(
        '%d messages spread evenly over the queues, one Consumer on all of them, prefetch %d, '
        'ack each.' % (n, kw.PREFETCH)))
    bench.emit('Rate relative to one queue:')
    bench.emit()
    bench.emit('| queues | ' + ' | '.join(b.name for b in brokers) + ' |')
    bench.emit('|---|' + '---|' * len(brokers))
    base = {b.name: median(rows[0][1][b.name]) for b in brokers}
    for label, res in rows:
        bench.emit('| %s | %s |' % (label.split(' (')[0], ' | '.join(
            '%.2f' % (median(res[b.name]) / base[b.name]) if base[b.name] else '-'
            for b in brokers)))
    bench.emit()


def run_celery(bench, brokers, only):
    tasks, rounds = bench.size['tasks'], bench.size['celery_rounds']
    if 'celery' in only:
        rows = []
        sends = {}
        for acks_late in (False, True):
            bench.log('== Celery no-op tasks, %d tasks, prefork -c 2, acks_late=%s' % (tasks, acks_late))
            res = alternate(brokers, rounds, bench.log,
                            lambda b, late=acks_late: cw.run_throughput(b, tasks, acks_late=late))
            rows.append(('no-op tasks%s (tasks/s)' % (', acks_late' if acks_late else ''), res))
            if not acks_late:
                bench.e2e = pick(res, 'rate')
            for name, runs in pick(res, 'send_rate').items():
                sends.setdefault(name, []).extend(runs)
        table = [(label, pick(res, 'rate')) for label, res in rows]
        table.append(('send_task in Producer.batch(), pre-filling (tasks/s)', sends))
        bench.compare('Celery end to end', table, brokers, 'tasks/s', note=(
            '%d no-op tasks (each INCRs a counter in the private Redis; no result backend) '
            'queued first, then one ready `celery worker -P prefork -c 2` (default prefetch '
            'multiplier 4) is told to consume them (add_consumer); rate = tasks / (end of last '
            '- start of first).' % tasks))
        bench.work('Celery', rows, brokers, 'from add_consumer to the last task; the task\'s own '
                   'counter writes are the set and incr calls')
    if 'latency' in only:
        seconds = bench.size['latency_s']
        rows = []
        for rate in LATENCY_RATES:
            bench.log('== latency at %d tasks/s for %d s' % (rate, seconds))
            res = alternate(brokers, rounds, bench.log,
                            lambda b, rate=rate: cw.run_latency(b, rate, seconds))
            rows += [('%s at %d/s (ms)' % (field.split('_')[0], rate), pick(res, field))
                     for field in ('p50_ms', 'p99_ms', 'max_ms')]
        bench.compare('Latency: enqueue to task start', rows, brokers, 'ms', higher_is_better=False,
                      note='%s tasks/s for %d s each into one worker (prefork -c 2); each task records '
                           'time.time() at start minus the send time passed as its argument. '
                           'Medians over rounds of each percentile.'
                           % (' and '.join(map(str, LATENCY_RATES)), seconds))
    if 'workers' in only:
        rows = []
        wrounds = bench.size['scaling_rounds']
        if bench.e2e:   # the same run as "no-op tasks" above
            rows.append(('1 worker (tasks/s), from above', bench.e2e))
        for count in (2, 4) if bench.e2e else (1, 2, 4):
            bench.log('== %d Celery workers (prefork -c 2 each), %d tasks' % (count, tasks))
            res = alternate(brokers, wrounds, bench.log,
                            lambda b, count=count: cw.run_throughput(b, tasks, workers=count))
            rows.append(('%d worker%s (tasks/s)' % (count, 's' if count > 1 else ''), pick(res, 'rate')))
        bench.compare('Scaling: Celery workers', rows, brokers, 'tasks/s', note=(
            '%d no-op tasks drained by 1, 2 and 4 workers (prefork -c 2 each) started together '
            'on this 2-core machine; %d round(s) (1 worker: the rounds above).' % (tasks, wrounds)))


def run_backlog(bench, brokers):
    total, step = bench.size['backlog'], bench.size['backlog_slice']
    redis_brokers = [b for b in brokers if b.name in (STREAMS, KOMBU_REDIS)]
    results = {}
    for broker in redis_brokers:
        bench.log('== backlog 0 -> %d messages: %s' % (total, broker.name))
        broker.reset()
        started = time.monotonic()
        results[broker.name] = kw.run_backlog(broker, total, step, bench.log)
        bench.log('   (%.0f s)' % (time.monotonic() - started))
        broker.reset()
    bench.emit('### Backlog growth: publish rate and Redis memory per message')
    bench.emit()
    bench.emit('One unconsumed queue grows from 0 to {:,} messages, published in '
               'Producer.batch(max_size=1000) (pipelined on both) through the default exchange; '
               'rate per slice of {:,}; memory is INFO `used_memory` growth divided by the '
               'messages queued. One run each.'.format(total, step))
    bench.emit()
    head = ['backlog'] + ['%s %s' % (b.name, what) for b in redis_brokers
                          for what in ('msg/s', 'bytes/msg')]
    bench.emit('| ' + ' | '.join(head) + ' |')
    bench.emit('|' + '---|' * len(head))
    for i, row in enumerate(results[redis_brokers[0].name]):
        cells = ['{:,}'.format(row['backlog'])]
        for b in redis_brokers:
            r = results[b.name][i]
            cells += ['{:,.0f}'.format(r['rate']), '{:,.0f}'.format(r['bytes_per_msg'])]
        bench.emit('| ' + ' | '.join(cells) + ' |')
    bench.emit()


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m benchmarks', description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='small sizes, about 3 minutes')
    parser.add_argument('--only', default=','.join(w for w in WORKLOADS if w != 'profile'),
                        help='comma-separated workloads among: %s (default: all but profile)'
                        % ', '.join(WORKLOADS))
    parser.add_argument('--rounds', type=int, help='rounds of every workload (default: kombu 3, '
                        'Celery 3, scaling 2; quick: 2, 1, 1)')
    parser.add_argument('--no-rabbit', action='store_true', help='skip RabbitMQ')
    parser.add_argument('--live-sources', action='store_true',
                        help='import celery_streams from the work tree instead of a copy made at '
                        'the start (a copy keeps the whole run on the same code)')
    parser.add_argument('--output', type=Path, help='markdown file to write (default: '
                        'benchmarks/results/{full,quick}.md)')
    args = parser.parse_args(argv)
    only = set(args.only.split(','))
    unknown = only - set(WORKLOADS)
    if unknown:
        parser.error('unknown workload(s): %s' % ', '.join(sorted(unknown)))
    if not args.live_sources:
        snapshot_sources()
    bench = Bench(args)
    output = args.output or ROOT / 'benchmarks' / 'results' / ('quick.md' if args.quick else 'full.md')

    server = RedisServer().start()
    started = time.monotonic()
    digest = sources_digest()
    try:
        brokers, note = make_brokers(server, with_rabbit=not args.no_rabbit)
        info = machine_info(server, rabbit_version() if not args.no_rabbit else None)
        bench.emit('## Results: %s mode, %s' % ('quick' if args.quick else 'full',
                                                 datetime.datetime.now().strftime('%Y-%m-%d %H:%M')))
        bench.emit()
        bench.emit('`python -m benchmarks%s%s` — brokers in run order: %s; rounds: kombu %d, '
                   'Celery %d, scaling %d; each cell is the median <sub>(min–max)</sub> of the '
                   'rounds.%s'
                   % (' --quick' if args.quick else '',
                      '' if args.only == parser.get_default('only') else ' --only ' + args.only,
                      ', '.join(b.name for b in brokers), bench.size['rounds'],
                      bench.size['celery_rounds'], bench.size['scaling_rounds'],
                      (' ' + note + '.') if note else ''))
        bench.emit()
        bench.emit('| machine | |')
        bench.emit('|---|---|')
        for key, value in info.items():
            bench.emit('| %s | %s |' % (key, value))
        bench.emit()
        run_kombu(bench, brokers, only)
        if 'celery' in only or 'latency' in only:
            run_celery(bench, brokers, only - {'workers'})
        if 'queues' in only:
            run_queues(bench, brokers)
        if 'backlog' in only:
            run_backlog(bench, brokers)
        if 'workers' in only:
            run_celery(bench, brokers, {'workers'})
        if 'profile' in only:
            from benchmarks import profiling
            profiling.run(bench, server, quick=args.quick)
        bench.emit('Total time: %.0f s; load average (1 min) at the end: %.2f.'
                   % (time.monotonic() - started, os.getloadavg()[0]))
        if sources_digest() != digest:
            bench.emit('**Warning: the celery_streams sources changed during the run** '
                       '(sha256 %s at the end): the runs measured different code.' % sources_digest())
        if sources_digest(ROOT) != digest:
            bench.emit('(The work tree changed during the run, sources sha256 %s now; this run '
                       'measured the copy made at its start.)' % sources_digest(ROOT))
    finally:
        server.stop()
        if common.CODE_DIR != ROOT:
            shutil.rmtree(common.CODE_DIR, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text('\n'.join(bench.lines) + '\n')
    print('\nwritten to %s' % output)
    return 0


if __name__ == '__main__':
    sys.exit(main())
