"""Remote text made safe to print on a terminal.

acmectl prints text that other parties wrote: a CA's problem details and
answers, hook output captured on a peer, certificate subjects, the
coordinator's error sentences. A terminal acts on control characters, so such
text could move the cursor, rewrite earlier lines, retitle the window or
forge whole lines (``\\r``, ``\\n``, ``ESC [ ...``). :func:`terminal_safe`
escapes every character that is not printable text, in the form Python
writes it (``\\x1b``, ``\\r``, ``\\u202e``): the sequence is visible and inert.
Newlines are kept only where the caller says the text is multi-line (a PEM
block); everything else stays on one line.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Collection

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Cn"})
"""Escaped: C0 and C1 controls with DEL and ESC (Cc), format characters such
as bidi overrides and zero-width ones (Cf), line and paragraph separators,
private use, surrogates, unassigned code points."""


def terminal_safe(text: str, *, multiline: bool = False) -> str:
    """``text`` with every control character escaped (``\\x1b[31m`` prints as
    the eight characters ``\\x1b[31m``). ``multiline``: keep ``\\n`` (and
    ``\\r\\n`` as ``\\n``); otherwise newlines are escaped too."""
    if text.isascii() and text.isprintable():
        return text  # the common case: nothing to escape
    if multiline:
        text = text.replace("\r\n", "\n")
    return "".join(_escape(ch) if unicodedata.category(ch) in ESCAPED_CATEGORIES and not (multiline and ch == "\n")
                   else ch for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch]
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def safe_message(msg: Message, multiline: Collection[str] = ()) -> Message:
    """A copy of the protobuf message ``msg`` whose every string field, in
    nested and repeated messages too, went through :func:`terminal_safe`.
    Fields named ``*_pem`` keep their newlines, and so do the fields whose
    full names are in ``multiline`` (``clusteracme.v1.Alarm.detail``)."""
    copy = type(msg)()
    copy.CopyFrom(msg)
    _clean(copy, frozenset(multiline))
    return copy


def _clean(msg: Message, multiline: frozenset[str]) -> None:
    for field, value in msg.ListFields():
        repeated = field.is_repeated
        keep = field.name.endswith("_pem") or field.full_name in multiline
        if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            # A map: its values are cleaned; its keys are left as they are (ids the code looks up).
            entry = field.message_type.fields_by_name["value"]
            for key in list(value):
                if entry.type == FieldDescriptor.TYPE_MESSAGE:
                    _clean(value[key], multiline)
                elif entry.type == FieldDescriptor.TYPE_STRING:
                    value[key] = terminal_safe(value[key], multiline=keep)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value if repeated else [value]:
                _clean(item, multiline)
        elif field.type == FieldDescriptor.TYPE_STRING:
            if repeated:
                cleaned = [terminal_safe(v, multiline=keep) for v in value]
                del value[:]
                value.extend(cleaned)
            else:
                setattr(msg, field.name, terminal_safe(value, multiline=keep))
