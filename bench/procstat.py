"""
CPU time and memory of a process, read from C{/proc} (Linux only).
"""

from __future__ import annotations

import os

_TICKS = os.sysconf("SC_CLK_TCK")


def cpuSeconds(pid: int) -> float:
    """
    User plus system CPU seconds of C{pid}, all its threads included.
    """
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    # The command name (field 2) may hold spaces: split after its ")".
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def memory(pid: int) -> dict[str, float]:
    """
    C{VmRSS} (resident now) and C{VmHWM} (peak resident) of C{pid} in MiB.
    """
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024.0
    return out


def resetPeak(pid: int) -> bool:
    """
    Reset C{VmHWM} of C{pid} to its current RSS (Linux 4.0+, needs permission
    to write C{/proc/PID/clear_refs}); C{False} when not possible.
    """
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def openFiles(pid: int) -> int:
    """
    How many file descriptors C{pid} has open.
    """
    return len(os.listdir(f"/proc/{pid}/fd"))


def machineBusy() -> float:
    """
    CPU seconds all processors of the machine spent busy since boot (all but
    idle and iowait), from C{/proc/stat}.
    """
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / _TICKS
