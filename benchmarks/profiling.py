"""Sampling profiles (py-spy) of the kombu publish and consume+ack paths.

The parent starts ``python -m benchmarks.profiling TARGET URL N`` in a child,
which sets up (declares, pre-fills) and waits; py-spy then attaches
(``--idle``, so time blocked on the socket counts) and the child runs the
workload. Percentages are of all samples of the workload (wall time).
"""
from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kombu import Consumer, Producer

from benchmarks import celery_workloads as cw
from benchmarks import kombu_workloads as kw
from benchmarks import common
from benchmarks.common import KOMBU_REDIS, STREAMS, make_brokers

RATE = 500   # samples per second
FRAME = re.compile(r'^(?P<func>.+?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$')
LAYERS = (('celery_streams', 'celery_streams'), ('kombu/utils/eventio', 'waiting in epoll'),
          ('kombu/', 'kombu'), ('celery/', 'celery'), ('billiard/', 'billiard'),
          ('redis/', 'redis-py'), ('amqp/', 'py-amqp'), ('json/', 'json'), ('socket.py', 'socket'))


def target(name, url, n):
    """The child: set up, say READY, wait for a line on stdin, run the workload."""
    import celery_streams  # noqa: F401
    from kombu import Connection

    queues = kw.make_queues(1)
    with Connection(url) as conn:
        if name == 'publish':
            channel = conn.channel()
            producer = Producer(channel)
            queues[0](channel).declare()

            def go():
                kw.publish(producer, queues, n)
        else:
            kw.fill(conn, queues, n)
            received = 0

            def on_message(_body, message):
                nonlocal received
                message.ack()
                received += 1

            def go():
                with Consumer(conn.channel(), queues, callbacks=[on_message],
                              prefetch_count=kw.PREFETCH, accept=['json']):
                    while received < n:
                        conn.drain_events(timeout=5)
        print('READY', flush=True)
        sys.stdin.readline()
        started = time.perf_counter()
        go()
        print('DONE %.0f msg/s' % (n / (time.perf_counter() - started)), flush=True)
        kw.cleanup(conn, queues)


def record(py_spy, url, name, n, out):
    child = subprocess.Popen([sys.executable, '-m', 'benchmarks.profiling', name, url, str(n)],
                             cwd=common.CODE_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if child.stdout.readline().strip() != 'READY':
        raise RuntimeError('profile target did not start')
    spy = subprocess.Popen([py_spy, 'record', '--pid', str(child.pid), '--rate', str(RATE), '--idle',
                            '--format', 'raw', '-o', str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.5)   # let py-spy attach
    child.stdin.write('go\n')
    child.stdin.flush()
    done = child.stdout.readline().strip()
    child.stdin.close()
    child.wait(60)
    spy.wait(60)   # py-spy stops and writes its output when the child exits
    return done


def spy(py_spy, out):
    """A ``profile(pid)`` hook for celery_workloads.run_throughput."""
    def start(pid):
        proc = subprocess.Popen([py_spy, 'record', '--pid', str(pid), '--rate', str(RATE), '--idle',
                                 '--format', 'raw', '-o', str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.5)   # let py-spy attach

        def stop():
            proc.send_signal(signal.SIGINT)   # py-spy writes its output and exits
            proc.wait(30)
        return stop
    return start


def parse(path, workload_only=True):
    """(samples per stack of (function, file) frames, total samples), workload frames only."""
    stacks, total = [], 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(' ')
        frames = []
        for raw in stack.split(';'):
            m = FRAME.match(raw.strip())
            if m:
                frames.append((m['func'], _short(m['file'])))
        if frames and frames[0][0] == 'Thread._bootstrap':
            continue   # background threads (e.g. a lease renewer): the main thread only
        if workload_only and not any(f.endswith('.go') and p.endswith('profiling.py')
                                     for f, p in frames):
            continue   # only what happens inside the timed workload
        stacks.append((frames, int(count)))
        total += int(count)
    return stacks, total


def _short(path):
    for marker in ('site-packages/', '/lib/python3.', str(common.CODE_DIR) + '/',
                   str(common.ROOT) + '/'):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == '/lib/python3.':
                path = path.split('/', 1)[1]
            break
    return path


def layer(path):
    for marker, name in LAYERS:
        if marker in path:
            return name
    return 'other (stdlib, benchmark)'


def summary(stacks, total, top=12):
    """Self time by layer, top functions by self time, top celery_streams functions inclusive."""
    layers, own, inclusive = collections.Counter(), collections.Counter(), collections.Counter()
    for frames, count in stacks:
        leaf = frames[-1]
        layers[layer(leaf[1])] += count
        own[leaf] += count
        for frame in set(frames):
            inclusive[frame] += count
    pct = lambda c: 100.0 * c / total  # noqa: E731
    ours = [(f, c) for f, c in inclusive.most_common() if 'celery_streams' in f[1]]
    return {
        'layers': [(name, pct(c)) for name, c in layers.most_common()],
        'self': [('%s:%s' % (f[1], f[0]), pct(c)) for f, c in own.most_common(top)],
        'inclusive': [('%s:%s' % (f[1], f[0]), pct(c)) for f, c in ours[:top]],
    }


def emit(bench, title, stacks, total):
    if not total:
        bench.emit('%s: no samples' % title)
        return
    s = summary(stacks, total)
    bench.emit('### %s, %d samples' % (title, total))
    bench.emit()
    bench.emit('Self time by layer: ' + ', '.join('%s %.0f%%' % lp for lp in s['layers']))
    bench.emit()
    bench.emit('| top self time | % | | celery_streams, inclusive | % |')
    bench.emit('|---|---|---|---|---|')
    for i in range(max(len(s['self']), len(s['inclusive']))):
        a = s['self'][i] if i < len(s['self']) else ('', None)
        b = s['inclusive'][i] if i < len(s['inclusive']) else ('', None)
        bench.emit('| %s | %s | | %s | %s |' % (
            '`%s`' % a[0] if a[0] else '', '' if a[1] is None else '%.1f' % a[1],
            '`%s`' % b[0] if b[0] else '', '' if b[1] is None else '%.1f' % b[1]))
    bench.emit()


def run(bench, server, quick=False):
    py_spy = shutil.which('py-spy') or str(Path(sys.executable).parent / 'py-spy')
    bench.emit('## Profiles')
    bench.emit()
    if not Path(py_spy).exists() and not shutil.which(py_spy):
        bench.emit('py-spy is not installed (`pip install py-spy`): no profiles.')
        return
    n = 5_000 if quick else 20_000
    brokers = {b.name: b for b in make_brokers(server, with_rabbit=False)[0]}
    bench.emit('py-spy %d Hz with `--idle` (time blocked on a socket counts), %% of the samples. '
               'kombu workloads: %d messages, the timed part only. Celery: the worker\'s main '
               'process (the consumer; the pool processes are not sampled) from add_consumer to '
               'the last task. Self = the function was on top of the stack; inclusive = anywhere '
               'on the stack; the layer of a sample is the package of its top frame.' % (RATE, n))
    bench.emit()
    tmp = Path(tempfile.mkdtemp(prefix='cs-bench-prof-'))
    for name in ('publish', 'consume'):
        for broker in (STREAMS, KOMBU_REDIS):
            brokers[broker].reset()
            out = tmp / ('%s-%s.txt' % (name, broker.replace(' ', '-')))
            done = record(py_spy, brokers[broker].url, name, n, out)
            bench.log('   profiled %s on %s: %s' % (name, broker, done))
            emit(bench, 'kombu %s, %s (%s under py-spy)' % (name, broker, done.split(' ', 1)[-1]),
                 *parse(out))
    tasks = 2_000 if quick else 10_000
    for broker in (STREAMS, KOMBU_REDIS):
        brokers[broker].reset()
        out = tmp / ('worker-%s.txt' % broker.replace(' ', '-'))
        result = cw.run_throughput(brokers[broker], tasks, profile=spy(py_spy, out))
        bench.log('   profiled the Celery worker on %s: %.0f tasks/s' % (broker, result['rate']))
        emit(bench, 'Celery worker main process, %s (%d no-op tasks, %.0f tasks/s under py-spy)'
             % (broker, tasks, result['rate']), *parse(out, workload_only=False))
    brokers[STREAMS].reset()
    bench.log('   raw py-spy stacks kept in %s' % tmp)


if __name__ == '__main__':
    target(sys.argv[1], sys.argv[2], int(sys.argv[3]))
