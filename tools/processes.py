"""Process helpers for local federations (simulation, localhost deployment): free ports,
finding processes by their command line, their listening sockets, starting a process again
while it is refused, and stopping a process tree by PID.

They read ``/proc`` (Linux). No Flower import here.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class Started:
    """Context-manager behaviour of a class that starts processes in ``start()`` and stops
    them in ``close()``: ``with`` starts it, and closes it on exit, also when ``start()``
    itself fails half-way."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):  # noqa: ANN204 - returns the subclass instance
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


@dataclass(frozen=True)
class ListeningSocket:
    """A TCP socket in the LISTEN state: its address, port and owning process."""

    address: str
    port: int
    pid: int

    @property
    def loopback(self) -> bool:
        """Whether only this machine can connect (127.0.0.0/8, ::1, or IPv4-mapped 127.x)."""
        ip = ipaddress.ip_address(self.address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_loopback


def _hex_address(text: str) -> str:
    # /proc/net/tcp{,6}: the address as hex of 32-bit words in host (little-endian) byte order
    raw = bytes.fromhex(text)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def listening_sockets(pids: Iterable[int]) -> list[ListeningSocket]:
    """The TCP sockets in LISTEN state that the processes ``pids`` hold (from ``/proc``; a
    process that has gone, or whose descriptors this user may not read, is skipped)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    found: list[ListeningSocket] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "0A":  # 0A: TCP_LISTEN
                continue
            if fields[9] in inodes:
                addr, port = fields[1].split(":")
                found.append(ListeningSocket(_hex_address(addr), int(port, 16), inodes[fields[9]]))
    return found


class StartRefused(RuntimeError):
    """A process started with :func:`start_with_retry` was refused for longer than its window."""


def start_with_retry(
    start: Callable[[int], subprocess.Popen[bytes]],
    ready: Callable[[subprocess.Popen[bytes]], bool],
    refused: Callable[[subprocess.Popen[bytes]], bool],
    window: float,
    every: float,
    poll: float = 0.2,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a long-running process until it is up, starting it again while it is refused.

    ``start(attempt)`` starts attempt ``attempt`` (0, 1, ...). The process is up once
    ``ready(proc)`` holds while it runs; if it exits first and ``refused(proc)`` holds (its
    exit code or log say it was turned away), it is started again ``every`` seconds later,
    for as long as ``window`` seconds from the first start (a restart policy's
    ``RestartSec`` within its start limit).

    Returns:
        ``(proc, refusals)``: the running, ready process and how many attempts were refused.

    Raises:
        StartRefused: still refused when ``window`` ran out, not up by then (it is stopped),
            or it exited for another reason.
    """
    deadline = time.monotonic() + window
    attempt = 0
    while True:
        proc = start(attempt)
        while proc.poll() is None and not ready(proc):
            if time.monotonic() > deadline:
                stop_pid(proc.pid)
                raise StartRefused(f"attempt {attempt + 1} was not up within {window:g} s")
            time.sleep(poll)
        if proc.poll() is None:
            return proc, attempt
        code = proc.returncode
        if not refused(proc):
            raise StartRefused(f"attempt {attempt + 1} exited with {code}, not refused: not retried")
        if time.monotonic() + every > deadline:
            raise StartRefused(f"still refused (exit {code}) after {attempt + 1} attempts in {window:g} s")
        log.info("attempt %d refused (exit %d); starting again in %g s", attempt + 1, code, every)
        time.sleep(every)
        attempt += 1
