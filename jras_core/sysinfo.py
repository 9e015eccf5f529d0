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


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the operating system (glibc ``malloc_trim(0)``).

    Arrays of a few MiB come from the heap, and glibc keeps the pages of freed ones: after a
    site's volumes are preprocessed and let go, hundreds of MiB would stay resident under
    everything the process does next. Returns whether anything was released (False off glibc).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(trim(0))


__all__ = ["peak_rss_mb", "release_free_heap"]
