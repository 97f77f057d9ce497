"""One dead letter in full (``celery streams dead-letters show``), its big values cut.

A dead letter is as big as the message it holds, tens of MB at times; shown
whole, its JSON is several times that (escaped bytes, and the body decoded
besides the payload). :func:`show_dead_letter` keeps each text value to
:data:`SHOW_LIMIT` characters, decodes a body of at most :data:`BODY_LIMIT`
bytes only, and lists what it cut (:class:`Cut`); ``full=True`` cuts
nothing. :func:`raw_field` gives one original field's bytes, as stored.
"""
from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

from kombu.utils.json import loads

from .deadletters import (FIELD, DeadLetter, UnknownDeadLetter, dead_letter_queues,
                          describe_dead_letter, select_dead_letters)
from .inventory import server_now_ms
from .keys import Keys
from .slots import Client

#: Characters of one text value shown: a record field, a header, a string of the body.
SHOW_LIMIT = 64 * 1024
#: Characters of an encoded message body decoded to show it; a bigger body is not decoded.
BODY_LIMIT = 1024 * 1024
#: Bytes of the payload kept as stored (``DeadLetterDetail.head``), to show an undecodable one.
HEAD = 1024


@dataclass
class Cut:
    """A value shown in part, or not at all (``shown`` 0)."""

    what: str        # 'record field:payload', 'body', 'headers.argsrepr', 'body[0][1]'...
    size: int        # its length: bytes for a record field, characters else
    shown: int       # the characters shown


@dataclass
class DeadLetterDetail:
    """One dead letter in full (``dead-letters show``): its summary, its record, its message."""

    dead_letter: DeadLetter
    record: dict                     # every field of the dead letter, as text (bytes escaped)
    headers: dict | None             # the message's headers (Celery: task, id, retries, eta...)
    properties: dict | None          # kombu's properties (delivery_info, priority...)
    content_type: str | None
    body: Any                        # the decoded body: JSON as data, else text; None if undecodable
    args: Any = None                 # a Celery task's positional arguments (protocol 2), if any
    kwargs: Any = None               # ... and keyword arguments
    cut: list[Cut] = field(default_factory=list)   # what is shown in part (empty with full=True)
    head: bytes | None = None        # the payload's first HEAD bytes, as stored (not in as_dict)

    def as_dict(self) -> dict:
        return {'dead_letter': self.dead_letter.as_dict(), 'record': self.record,
                'headers': self.headers, 'properties': self.properties,
                'content_type': self.content_type, 'body': self.body,
                'args': self.args, 'kwargs': self.kwargs, 'cut': [asdict(c) for c in self.cut]}


def find_dead_letter(client: Client, *, global_keyprefix: str = '', id: str,
                     queues: Iterable[str] | None = None) -> tuple[str, str, dict]:
    """``(queue, id, raw fields)`` of the dead letter ``id`` (``QUEUE/ID`` or ``ID``).

    Among ``queues`` (default: every queue with dead letters); raises
    :class:`UnknownDeadLetter`, or :class:`~celery_streams.deadletters.AmbiguousDeadLetter` for a bare
    id found in several queues.
    """
    keys = Keys(global_keyprefix)
    [found] = select_dead_letters(client, keys, dead_letter_queues(client, keys, queues), [id])
    return found


def show_dead_letter(client: Client, *, global_keyprefix: str = '', id: str,
                     queues: Iterable[str] | None = None, full: bool = False) -> DeadLetterDetail:
    """The dead letter ``id`` (see :func:`find_dead_letter`), decoded; big values cut unless ``full``."""
    queue, entry_id, fields = find_dead_letter(client, global_keyprefix=global_keyprefix, id=id,
                                               queues=queues)
    summary = describe_dead_letter(queue, entry_id, fields, server_now_ms(client))
    limit = None if full else SHOW_LIMIT
    cut: list[Cut] = []
    record = {_decode(k): _clip_bytes('record ' + _decode(k), v, limit, cut) for k, v in fields.items()}
    payload = fields.get(b'field:payload', fields.get('field:payload'))
    head = None if payload is None else _bytes(payload)[:HEAD]
    envelope = None
    try:
        envelope = loads(payload)
    except Exception:
        pass
    del fields, payload
    if not isinstance(envelope, dict):
        return DeadLetterDetail(summary, record, None, None, None, None, cut=cut, head=head)
    properties = envelope.get('properties') if isinstance(envelope.get('properties'), dict) else None
    body = _clip(_decoded_body(envelope, properties or {}, full, cut), 'body', limit, cut)
    args = kwargs = None
    if isinstance(body, list) and len(body) == 3 and isinstance(body[0], list) and isinstance(body[1], dict):
        args, kwargs = body[0], body[1]   # Celery's task protocol 2: [args, kwargs, embed]
    headers = envelope.get('headers') if isinstance(envelope.get('headers'), dict) else None
    return DeadLetterDetail(summary, record, _clip(headers, 'headers', limit, cut),
                            _clip(properties, 'properties', limit, cut),
                            _clip(envelope.get('content-type'), 'content_type', limit, cut),
                            body, args, kwargs, cut, head)


def raw_field(client: Client, *, global_keyprefix: str = '', id: str,
              queues: Iterable[str] | None = None, name: str = 'payload') -> bytes:
    """The bytes of the original field ``name`` of the dead letter ``id``, as stored."""
    queue, entry_id, fields = find_dead_letter(client, global_keyprefix=global_keyprefix, id=id,
                                               queues=queues)
    value = fields.get((FIELD + name).encode(), fields.get(FIELD + name))
    if value is None:
        raise UnknownDeadLetter('dead letter %s/%s has no %s field (its fields: %s)' % (
            queue, entry_id, name, ', '.join(_decode(k) for k in fields) or 'none'))
    return _bytes(value)


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _decoded_body(envelope: Mapping, properties: Mapping, full: bool, cut: list[Cut]) -> Any:
    body = envelope.get('body')
    if not isinstance(body, str):
        return None
    if not full and len(body) > BODY_LIMIT:
        cut.append(Cut('body', len(body), 0))
        return None
    try:
        if properties.get('body_encoding') == 'base64':
            body = base64.b64decode(body).decode('utf-8')
        return loads(body) if 'json' in str(envelope.get('content-type') or '') else body
    except Exception:
        return None


def _clip(value: Any, path: str, limit: int | None, cut: list[Cut]) -> Any:
    """``value`` with every string longer than ``limit`` cut to it (noted in ``cut``)."""
    if limit is None:
        return value
    if isinstance(value, str):
        if len(value) <= limit:
            return value
        cut.append(Cut(path, len(value), limit))
        return value[:limit]
    if isinstance(value, dict):
        return {k: _clip(v, '%s.%s' % (path, k), limit, cut) for k, v in value.items()}
    if isinstance(value, list):
        return [_clip(v, '%s[%d]' % (path, n), limit, cut) for n, v in enumerate(value)]
    return value


def _clip_bytes(path: str, value: Any, limit: int | None, cut: list[Cut]) -> str:
    """A record field as text (bytes escaped), its first ``limit`` bytes only (noted in ``cut``)."""
    if not isinstance(value, bytes):
        return _clip(str(value), path, limit, cut)
    if limit is not None and len(value) > limit:
        cut.append(Cut(path, len(value), limit))
        value = value[:limit]
    return _decode(value)


def _decode(value: Any) -> str:
    return value.decode('utf-8', 'backslashreplace') if isinstance(value, bytes) else str(value)
