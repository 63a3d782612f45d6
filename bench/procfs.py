"""CPU time and memory of a process tree, read from ``/proc`` (proc(5)).

CPU comes from ``/proc/PID/stat`` (utime, stime and the reaped children's cutime, cstime, in
clock ticks), memory from ``/proc/PID/status`` (VmRSS, VmHWM in kB). Parsers are pure.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "CLOCK_TICKS",
    "Memory",
    "ProcStat",
    "parse_stat",
    "parse_status",
    "parse_system_busy",
    "read_stat",
    "reset_peak",
    "system_busy_seconds",
    "tree_cpu_seconds",
    "tree_memory",
    "tree_pids",
]

#: USER_HZ: what utime/stime count in (100 on every Linux we run on; read, not assumed).
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
PROC: Final = Path("/proc")


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcStat:
    """The fields of ``/proc/PID/stat`` the benchmark reads; times in clock ticks."""

    pid: int
    comm: str
    ppid: int
    utime: int
    stime: int
    cutime: int
    cstime: int

    @property
    def ticks(self) -> int:
        """CPU of the process, its threads and its reaped children, in clock ticks."""
        return self.utime + self.stime + self.cutime + self.cstime


@dataclass(frozen=True, slots=True, kw_only=True)
class Memory:
    """Resident set now and its peak (high-water mark), in bytes."""

    rss: int
    hwm: int


def parse_stat(text: str) -> ProcStat:
    """Parse one ``/proc/PID/stat`` line.

    proc(5): field 2 is the command in parentheses and may itself hold spaces and ``)``, so the
    fields after it are split from the *last* ``)``. Fields 4, 14-17 are ppid, utime, stime,
    cutime, cstime.

    Args:
        text: the file's content.

    Returns:
        The parsed fields.

    Raises:
        ValueError: the text is not a stat line.
    """
    head, sep, tail = text.strip().rpartition(")")
    pid_text, open_paren, comm = head.partition(" (")
    if not sep or not open_paren:
        raise ValueError(f"not a /proc/PID/stat line: {text[:80]!r}")
    fields = tail.split()
    # fields[0] is field 3 (state); field N is fields[N - 3].
    if len(fields) < 15:
        raise ValueError(f"/proc/PID/stat line has {len(fields) + 2} fields, expected at least 17")
    return ProcStat(
        pid=int(pid_text),
        comm=comm,
        ppid=int(fields[1]),
        utime=int(fields[11]),
        stime=int(fields[12]),
        cutime=int(fields[13]),
        cstime=int(fields[14]),
    )


def parse_status(text: str) -> Memory:
    """Parse VmRSS and VmHWM out of ``/proc/PID/status`` (values in kB, i.e. KiB).

    Raises:
        ValueError: either line is missing (a kernel thread or a zombie has neither).
    """
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if sep and key in ("VmRSS", "VmHWM"):
            number, _, unit = rest.strip().partition(" ")
            if unit.strip() != "kB":
                raise ValueError(f"{key} in unexpected unit {unit!r}")
            values[key] = int(number) * 1024
    if "VmRSS" not in values or "VmHWM" not in values:
        raise ValueError("no VmRSS/VmHWM in /proc/PID/status")
    return Memory(rss=values["VmRSS"], hwm=values["VmHWM"])


def parse_system_busy(text: str) -> int:
    """Busy clock ticks of all CPUs together from ``/proc/stat``'s first (``cpu``) line.

    proc(5): user nice system idle iowait irq softirq steal guest guest_nice; busy is all but
    idle and iowait (guest time is already inside user). Steal counts as busy: the hypervisor
    gave that time to someone else, which disturbs a measurement just as another process does.

    Raises:
        ValueError: no ``cpu`` line.
    """
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            numbers = [int(f) for f in fields[1:9]]
            return sum(numbers) - numbers[3] - numbers[4]
    raise ValueError("no aggregate cpu line in /proc/stat")


def system_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used so far (all CPUs added)."""
    return parse_system_busy((PROC / "stat").read_text()) / CLOCK_TICKS


def read_stat(pid: int) -> ProcStat:
    """``/proc/PID/stat`` of a live process.

    Raises:
        OSError: the process is gone.
    """
    return parse_stat((PROC / str(pid) / "stat").read_text())


def _all_stats() -> Iterable[ProcStat]:
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                yield parse_stat((entry / "stat").read_text())
            except (OSError, ValueError):
                continue  # exited while we looked


def tree_pids(root: int) -> list[int]:
    """``root`` and every live descendant (``--workers`` children, exporter subprocesses)."""
    children: dict[int, list[int]] = {}
    for stat in _all_stats():
        children.setdefault(stat.ppid, []).append(stat.pid)
    found = [root]
    index = 0
    while index < len(found):
        found.extend(children.get(found[index], ()))
        index += 1
    return found


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by ``root``'s process tree (threads and reaped children included)."""
    ticks = 0
    for pid in tree_pids(root):
        try:
            ticks += read_stat(pid).ticks
        except OSError:
            continue
    return ticks / CLOCK_TICKS


def tree_memory(root: int) -> Memory:
    """Summed VmRSS and VmHWM of ``root``'s process tree (for one process, its own)."""
    rss = hwm = 0
    for pid in tree_pids(root):
        try:
            memory = parse_status((PROC / str(pid) / "status").read_text())
        except (OSError, ValueError):
            continue
        rss += memory.rss
        hwm += memory.hwm
    return Memory(rss=rss, hwm=hwm)


def reset_peak(root: int) -> bool:
    """Reset VmHWM to the current RSS for the whole tree (``clear_refs`` value 5, Linux >= 4.0).

    Returns:
        False when the kernel refused (not root, or too old); the caller then compares peaks.
    """
    done = True
    for pid in tree_pids(root):
        try:
            (PROC / str(pid) / "clear_refs").write_text("5")
        except OSError:
            done = False
    return done
