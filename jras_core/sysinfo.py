"""Facts about the running process that benchmarks and sites report."""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB.

    On Linux this is ``VmHWM`` of ``/proc/self/status``: ``ru_maxrss`` of a process
    started by fork/vfork + exec keeps its parent's peak (the kernel carries the old
    address space's high-water mark across exec), which would report the parent's
    peak instead of this process's. Elsewhere: ``resource.getrusage(RUSAGE_SELF).ru_maxrss``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


__all__ = ["peak_rss_mb"]
