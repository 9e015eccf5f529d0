"""Process helpers for local federations (simulation, localhost deployment): free ports,
finding processes by their command line, and stopping a process tree by PID.

They read ``/proc`` (Linux). No Flower import here.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ppid(stat: str) -> int:
    # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses
    return int(stat.rsplit(")", 1)[1].split()[1])


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def child_pids(pid: int) -> list[int]:
    """All live descendants of ``pid`` (from ``/proc``), in breadth-first order (children first)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = _ppid((entry / "stat").read_text())
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def pids_with_args(*needles: str) -> list[int]:
    """PIDs of this user's processes (other than this one) whose command line contains
    every one of ``needles`` (arguments joined by spaces)."""
    found: list[int] = []
    me, uid = os.getpid(), os.getuid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline and all(n in cmdline for n in needles):
            found.append(int(entry.name))
    return found


def is_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
        return _state(pid) != "Z"
    except (ProcessLookupError, FileNotFoundError, PermissionError, IndexError):
        return False


def stop_pid(pid: int, timeout: float = 5.0) -> None:
    """Stop ``pid`` and all its descendants: SIGTERM to each, then SIGKILL to any still
    alive after ``timeout`` seconds. Descendants are collected before signalling, so
    children that a dying parent leaves behind are stopped too."""
    victims = [pid] + child_pids(pid)
    for p in victims:
        try:
            os.kill(p, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + timeout
    for p in victims:
        while is_alive(p) and time.monotonic() < deadline:
            time.sleep(0.1)
        if is_alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
