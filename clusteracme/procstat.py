"""What the kernel says about a running process (Linux ``/proc``): resident
memory for the benchmarks and the memory budget of an idle agent.

Reads ``/proc/<pid>/status`` only; nothing here imports the daemons.
"""

from __future__ import annotations

from pathlib import Path

from clusteracme.errors import NotFound


def status_fields(pid: int) -> dict[str, str]:
    """The ``Name: value`` lines of ``/proc/<pid>/status``, values stripped.

    Raises NotFound when the process does not exist (any more).
    """
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise NotFound(f"no process {pid}") from exc
    fields = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields[name] = value.strip()
    return fields


def _kib(value: str) -> int:
    number, _, unit = value.partition(" ")
    if unit != "kB":  # the kernel always reports these in kB; anything else is not what we think
        raise ValueError(f"unexpected /proc status value {value!r}")
    return int(number) * 1024


def rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS) of ``pid`` in bytes; NotFound if it is gone."""
    fields = status_fields(pid)
    if "VmRSS" not in fields:  # a zombie has no memory map left
        raise NotFound(f"process {pid} has exited")
    return _kib(fields["VmRSS"])


def peak_rss_bytes(pid: int) -> int:
    """High-water mark of the resident set (VmHWM) of ``pid`` in bytes."""
    fields = status_fields(pid)
    if "VmHWM" not in fields:
        raise NotFound(f"process {pid} has exited")
    return _kib(fields["VmHWM"])
