"""The soak's figures of the features it runs besides plain delivery (:mod:`benchmarks.soak`).

* Unique tasks: each has a key of its own, and a duplicate published right
  behind it with the same key, while the first is sure to hold it: every
  duplicate must be dropped, and once every task ran no key may be left.
* Global rate limits: the first runs of the ``limited`` tasks, against their
  limit (``--limit``): the most started in any 1 s window, and the mean rate
  while they were held back. Reruns after a kill are left out (a task killed
  while running starts again, as any other). The limit spaces the starts it
  reserves; a task starts later than its reserved start when its worker's pool
  is busy, when its consumer was killed (reclaimed after ``visibility_timeout``)
  or Redis was down, and starts that came late can bunch: the windows within
  :data:`SETTLE` seconds after a fault or a kill are shown apart.
"""
from __future__ import annotations

import collections

from celery_streams import rates

#: Seconds after a fault or a kill whose windows are shown apart.
SETTLE = 15.0


def most_in_window(starts, width=1.0) -> int:
    """The most ``starts`` (seconds) in any window of ``width`` seconds."""
    starts = sorted(starts)
    most, j = 0, 0
    for i, start in enumerate(starts):
        while j < len(starts) and starts[j] < start + width:
            j += 1
        most = max(most, j - i)
    return most


def limit_figures(limit: str, starts, disturbances=()) -> dict:
    """The report's lines on the rate limit, from the first start of each limited task;
    ``disturbances``: when the faults and kills happened (``time.time()``)."""
    figures: dict = collections.OrderedDict()
    per_second = rates.per_second(limit)
    starts = sorted(starts)
    figures['rate-limited tasks (limit %s): ran' % limit] = len(starts)
    if len(starts) < 2:
        return figures
    most = most_in_window(starts)
    # The limit spaces the starts it reserves; a task starts a little after (its worker's
    # pool, the read), and one read up to an interval late still starts (limits.LATE_MS):
    # a window can hold one or two more than the rate without the limit being broken.
    at_rate = int(per_second) + 1   # the rate, and the one a burst of 1 starts at once
    calm = most_in_window([t for t in starts if not any(0 <= t - at < SETTLE for at in disturbances)])
    figures['  most started in any 1 s (at the rate: %d)' % at_rate] = most
    figures['  most started in any 1 s, away from faults and kills'] = '%d%s' % (
        calm, ' **EXCEEDED**' if calm > at_rate + 2 else '')
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    paced = [gap for gap in gaps if gap < 2.0 / per_second]   # while a backlog was held back
    if paced:
        figures['  mean rate while held back (tasks/s)'] = '%.2f over %d starts' % (
            len(paced) / sum(paced), len(paced))
    return figures


def unique_figures(sent: int, duplicates, by_token, leaked) -> dict:
    """The report's lines on unique tasks: duplicates dropped, and keys left at the end."""
    ran = sorted(t for t in duplicates if t in by_token)
    return collections.OrderedDict([
        ('unique tasks sent / duplicates published behind them', '%d / %d' % (sent, len(duplicates))),
        ('  duplicates that ran (must be 0)', '%d%s' % (len(ran), ' **%s**' % ran[:5] if ran else '')),
        ('  uniqueness keys left once all ran (must be 0)', '%d%s' % (
            len(leaked), ' **%s**' % leaked[:5] if leaked else '')),
    ])
