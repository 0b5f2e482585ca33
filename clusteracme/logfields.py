"""Structured log fields: what a log line is about, as keys next to its message.

This module owns the field names (:data:`FIELDS`, documented in the README's
"Logs" section) and where a line's fields come from, in this order (a later
source wins a name the earlier one also sets):

1. the process: :func:`set_process_fields` once at start (an agent's ``peer``,
   a coordinator's ``replica``);
2. the context: :func:`log_context` (a ``with`` block) and :func:`bind` (the
   rest of the current task), kept in a :mod:`contextvars` variable. asyncio
   copies the context into every task at its creation and
   ``asyncio.to_thread`` into its thread, so the work an order, an RPC or a
   scheduler tick starts carries the fields without passing them around;
   :func:`detached` gives a task that serves many callers (a batching lane)
   none of its creator's;
3. the call: ``log.info(..., extra={"serial": ...})``.

:class:`ContextFilter` (on the daemons' handler) gathers them into
``record.log_fields`` when the line is logged, in the logging task or thread;
the formatters in ``clusteracme.daemon`` write them out. Standard-library
logging with a context variable is all this needs: every module keeps its
``logging.getLogger(__name__)`` and its %-style messages, and the libraries'
own lines (grpc, aiohttp, etcd) go through the same handler and get the
fields of the task they ran in. (structlog would mean a second logging API
for the same handler.)
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from clusteracme.safetext import terminal_safe

FIELDS: Mapping[str, str] = MappingProxyType({
    "order_id": "the ACME order (16 hex digits, as acmectl order show takes it)",
    "order_ids": "the orders one call to an agent carries (token pushes are batched per peer)",
    "peer": "the peer id: the peer an action is about; on an agent, always the agent's own",
    "domain": "the certificate slot: its domain, or \"\" for the peer's server slot",
    "phase": "the order's phase (queued, new, ordered, ..., done, failed)",
    "provider": "the ACME provider (account) name",
    "who": "the identity that asked, from its mTLS certificate (operator:alice, coordinator:c1, agent:peer1); "
           "for an order or a scheduled deploy, who started it",
    "rpc": "the gRPC method being served",
    "serial": "a certificate serial number (hex)",
    "event": "what happened, for lines that record an outcome: order-phase, deploy, rollback, verify, rollout, "
             "reload, register, import, tokens-present/tokens-remove (debug)",
    "rollout": "the id of one acmectl rollout, on every line of its deploys",
    "target": "a reload target on an agent (tls ADDRESS, command ..., signal ...)",
    "replica": "the coordinator replica that wrote the line (its name)",
})
"""The field names, stable across versions, with what each holds. Only these
are keys of a JSON line; any other name a line carries (a library's own
``extra=``, such as aiohttp's access log with its request's headers) goes
under :data:`EXTRA`, as JSON-safe values, and is left out of a text line."""

EXTRA = "extra"
"""The key of the object holding a line's names that are not :data:`FIELDS`."""

MAX_VALUE = 512
"""Longest string value written (longer ones are cut, with "..."): a field
from a request must not turn one line into a megabyte."""

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("clusteracme_log_fields", default=_EMPTY)
_process: dict[str, Any] = {}

# Every attribute a LogRecord has by itself; anything else on a record came from extra=.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName",
                                                                             "log_fields"}


def _merged(base: Mapping[str, Any], fields: Mapping[str, Any]) -> Mapping[str, Any]:
    """``base`` with ``fields`` over it; a None value removes the name."""
    out = dict(base)
    for name, value in fields.items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return MappingProxyType(out)


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every line logged inside the block (and by the tasks
    started inside it); a None value hides a name an outer context set.
    Blocks nest; leaving one restores what was there before, including what
    :func:`bind` added inside it."""
    token = _context.set(_merged(_context.get(), fields))
    try:
        yield
    finally:
        _context.reset(token)


def bind(**fields: Any) -> None:
    """Add ``fields`` for the rest of the current task (or until the
    :func:`log_context` block around this call ends); None removes a name.
    Call it at the top of a task's own coroutine: in a coroutine awaited by
    another, it changes the awaiting task's fields too."""
    _context.set(_merged(_context.get(), fields))


def detached(**fields: Any) -> contextvars.Context:
    """A copy of the current context with only ``fields`` (and the
    process's): for ``asyncio.create_task(..., context=detached(...))`` when
    the new task will serve others than the caller that happens to start it."""
    ctx = contextvars.copy_context()
    ctx.run(_context.set, _merged(_EMPTY, fields))
    return ctx


def set_process_fields(**fields: Any) -> None:
    """Fields of every line this process writes, from any task or thread
    (None removes one). Set once, at start."""
    for name, value in fields.items():
        if value is None:
            _process.pop(name, None)
        else:
            _process[name] = value


def process_fields() -> dict[str, Any]:
    return dict(_process)


def current() -> dict[str, Any]:
    """The fields a line logged here and now would carry (before its extra=)."""
    return {**_process, **_context.get()}


def _value(value: Any) -> Any:
    """``value`` as JSON can hold it: a number, a string (``str()`` of
    anything else, cut at :data:`MAX_VALUE`), a list of those."""
    if isinstance(value, bool | int) or value is None or (isinstance(value, float) and math.isfinite(value)):
        return value
    if isinstance(value, list | tuple | set | frozenset):
        return [_value(v) for v in value][:64]
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= MAX_VALUE else text[:MAX_VALUE] + "..."


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The process's fields, the context's, then the record's extra= (where
    a None value is no value: it leaves the context's): the names of
    :data:`FIELDS` in its order (lines read alike whatever set them first),
    then any other name under :data:`EXTRA`, sorted."""
    fields = current()
    for name, value in vars(record).items():
        if name not in _STANDARD and not name.startswith("_") and value is not None:
            fields[name] = value
    out = {name: _value(fields[name]) for name in FIELDS if fields.get(name) is not None}
    other = {name: _value(fields[name]) for name in sorted(fields) if name not in FIELDS and fields[name] is not None}
    if other:
        out[EXTRA] = other
    return out


class ContextFilter(logging.Filter):
    """Puts the line's fields on the record (``record.log_fields``) when it is
    logged: in the task or thread that logged it, whose context holds them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "log_fields"):
            record.log_fields = fields_of(record)
        return True


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """What :class:`ContextFilter` put on the record (gathered now if it did not run)."""
    fields = getattr(record, "log_fields", None)
    return fields if isinstance(fields, dict) else fields_of(record)


_PLAIN = re.compile(r"[\w.:/@+-]+")


def text_suffix(record: logging.LogRecord, message: str) -> str:
    """The fields for a text line: `` [name=value ...]``, or "".

    Left out: empty values, the process's own fields (the log file or unit
    says which process it is), names other than :data:`FIELDS` (a JSON line's
    :data:`EXTRA`), and values the message already says as a word
    of its own (``order 1a2b...: ...`` needs no ``order_id=1a2b...``). A
    value other than a plain word is quoted, its control characters escaped:
    a field from a request cannot forge a line."""
    process = _process
    parts = []
    for name, value in record_fields(record).items():
        if name == EXTRA or value == "" or value == [] or process.get(name, _EMPTY) == value:
            continue
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        if _said(text, message):
            continue
        if not _PLAIN.fullmatch(text):
            text = terminal_safe(json.dumps(text, ensure_ascii=False))
        parts.append(f"{name}={text}")
    return f" [{' '.join(parts)}]" if parts else ""


def _said(value: str, message: str) -> bool:
    start = message.find(value)
    while start >= 0:
        end = start + len(value)
        before = message[start - 1] if start else " "
        after = message[end] if end < len(message) else " "
        if not (before.isalnum() or before in "_-.") and not (after.isalnum() or after in "_-"):
            return True
        start = message.find(value, start + 1)
    return False
