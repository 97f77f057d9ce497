"""The demo: a real worker on Redis Streams, drained and nuked while it works.

Run ``python3 run.py demo`` (or ``python -m celery_streams.demo``). Without
``--url`` (or ``CELERY_STREAMS_DEMO_URL``) it starts an embedded server; with
one it works under its own random key prefix and removes its keys afterwards.

This module is also the demo's Celery app (``-A celery_streams.demo``),
configured from ``CELERY_STREAMS_DEMO_BROKER`` / ``CELERY_STREAMS_DEMO_PREFIX``.
"""
from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import time
from contextlib import ExitStack

import redis
from celery import Celery

from . import admin
from .keys import Keys

app = Celery('celery_streams_demo')
app.conf.update(
    broker_url=os.environ.get('CELERY_STREAMS_DEMO_BROKER', 'redis://127.0.0.1:6379/0'),
    broker_transport='celery_streams.transport:Transport',
    broker_transport_options={'global_keyprefix': os.environ.get('CELERY_STREAMS_DEMO_PREFIX', '')},
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
)


@app.task(name='demo.work')
def work(seconds, token):
    """Sleep a little, then note that ``token`` ran (so the demo can count)."""
    time.sleep(seconds)
    client = redis.Redis.from_url(app.conf.broker_url)
    client.rpush(Keys(app.conf.broker_transport_options['global_keyprefix']).prefix + 'demo:ran', token)


class Demo:
    def __init__(self, url: str, prefix: str):
        self.url, self.prefix = url, prefix
        self.client = redis.Redis.from_url(url)
        self.keys = Keys(prefix)
        self.ran_key = self.keys.prefix + 'demo:ran'
        self.env = dict(os.environ, CELERY_STREAMS_DEMO_BROKER=url, CELERY_STREAMS_DEMO_PREFIX=prefix)
        app.conf.broker_url = url
        app.conf.broker_transport_options = {'global_keyprefix': prefix}
        self.worker = None
        self.t0 = time.monotonic()

    def say(self, text):
        print('[%6.2fs] %s' % (time.monotonic() - self.t0, text), flush=True)

    def celery(self, *args, **kwargs):
        return subprocess.run([sys.executable, '-m', 'celery', '-A', 'celery_streams.demo', *args],
                              env=self.env, **kwargs)

    def start_worker(self):
        self.say('starting a real `celery worker` (prefork, 2 processes) on the streams transport')
        self.worker = subprocess.Popen(
            [sys.executable, '-m', 'celery', '-A', 'celery_streams.demo', 'worker', '-c', '2',
             '-l', 'warning', '--without-heartbeat'], env=self.env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.monotonic()
        while not app.control.ping(timeout=0.5):
            if self.worker.poll() is not None:
                raise SystemExit('the worker exited with code %s' % self.worker.returncode)
            self.progress('waiting for the worker to answer ping', time.monotonic() - started)
        self.end_progress()
        self.say('worker ready after %.1fs' % (time.monotonic() - started))

    @staticmethod
    def progress(label, value, total=None):
        if not sys.stdout.isatty():
            return
        shown = '%d/%d' % (value, total) if total else '%.1fs' % value
        print('\r         %s ... %s   ' % (label, shown), end='', flush=True)

    @staticmethod
    def end_progress():
        if sys.stdout.isatty():
            print('\r' + ' ' * 70 + '\r', end='', flush=True)

    def send(self, count, seconds, tag):
        started = time.monotonic()
        with app.producer_or_acquire() as producer:
            for i in range(count):
                work.apply_async((seconds, '%s-%d' % (tag, i)), producer=producer)
        return time.monotonic() - started

    def ran(self, tag):
        return sum(1 for t in self.client.lrange(self.ran_key, 0, -1) if t.decode().startswith(tag + '-'))

    def wait_ran(self, tag, count, timeout=60):
        started = time.monotonic()
        while self.ran(tag) < count and time.monotonic() - started < timeout:
            self.progress('tasks run', self.ran(tag), count)
            time.sleep(0.1)
        self.end_progress()
        return time.monotonic() - started

    def groups(self):
        return {key: sorted(g['name'].decode() for g in self.client.xinfo_groups(key))
                for key in self.client.scan_iter(match=self.keys.match_queue_keys, _type='stream')}

    def run(self):
        self.start_worker()

        took = self.send(200, 0.005, 'batch')
        self.say('sent 200 tasks in %.2fs' % took)
        self.say('all 200 ran %.2fs later' % self.wait_ran('batch', 200))

        self.send(3000, 0.01, 'backlog')
        self.say('sent a backlog of 3000 slow tasks; the worker is busy. `celery streams status`:')
        self.celery('streams', 'status', '-Q', 'celery')
        before = self.groups()
        drained = admin.drain(self.client, global_keyprefix=self.prefix, queues=['celery'])
        after = self.groups()
        for queue in drained:
            self.say('drain: queue %r: %d messages removed, %d pending entries cleared, '
                     'groups kept: %s' % (queue.queue, queue.removed, queue.pending_cleared,
                                          ', '.join(queue.groups_kept)))
        self.say('consumer groups identical before and after: %s' % (before == after))
        self.send(20, 0, 'after-drain')
        self.say('20 tasks sent after the drain ran %.2fs later (no restart)'
                 % self.wait_ran('after-drain', 20))
        self.say('backlog tasks run before the drain, or reserved in worker memory then: %d'
                 % self.ran('backlog'))

        nuked = admin.nuke(self.client, global_keyprefix=self.prefix)
        self.say('nuke: destroyed %d groups, deleted %d streams and %d other keys'
                 % (len(nuked.groups), len(nuked.streams), len(nuked.other_keys)))
        time.sleep(0.2)
        self.send(20, 0, 'after-nuke')
        self.say('20 tasks sent after the nuke ran %.2fs later: the worker healed itself'
                 % self.wait_ran('after-nuke', 20))
        self.say('groups re-created by the worker: %s' % sorted(set(
            self.keys.parse(k.decode()).queue for k, names in self.groups().items() if names)))

    def close(self):
        if self.worker is not None and self.worker.poll() is None:
            self.say('stopping the worker (warm shutdown)')
            self.worker.terminate()
            self.worker.wait(30)
        admin.nuke(self.client, global_keyprefix=self.prefix)
        self.say('removed every key under %r' % self.keys.prefix)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--url', default=os.environ.get('CELERY_STREAMS_DEMO_URL'),
                        help='a Redis URL to use instead of an embedded server')
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        url = args.url
        if not url:
            from .embedded import EmbeddedServer
            server = stack.enter_context(EmbeddedServer())
            url = server.url
            print('started an embedded %s on 127.0.0.1:%d' % (server.version(), server.port))
        demo = Demo(url, 'demo-%s:' % secrets.token_hex(3))
        stack.callback(demo.close)
        demo.run()
    print('done.')


if __name__ == '__main__':
    main()
