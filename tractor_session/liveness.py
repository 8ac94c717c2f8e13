"""Knowing, from trio, when a process is gone.

On Linux a pidfd becomes readable the moment its process exits, so the
daemon learns of a holder's death at once without polling, and a signal
sent through the pidfd cannot hit a process that reused the pid.
Elsewhere we poll with psutil.

A process is named by its pid *and* its start time: a pid alone may have
been reused by an unrelated process since we first saw it.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Awaitable, Callable

import psutil
import trio

POLL_INTERVAL = 0.5
HAVE_PIDFD = sys.platform.startswith("linux") and hasattr(os, "pidfd_open")
HAVE_PROC_STAT = sys.platform.startswith("linux")


def _read_small(path: str) -> bytes:
    """One read of a small /proc file, without a buffered file object
    (several times cheaper; these run for every lease)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def last_pid() -> int | None:
    """The pid most recently handed out on this host (Linux), or None.

    If it has not changed between two readings, no process (or thread) was
    created in between: the daemon uses that to skip scanning for a
    session's leftovers when nothing can have been started inside it.
    """
    try:
        return int(_read_small("/proc/sys/kernel/ns_last_pid"))
    except (OSError, ValueError):
        return None


def start_time(pid: int) -> float | None:
    """A stamp of when ``pid`` started, or None if no such process runs.

    Only ever compared with another stamp from this function: on Linux it
    is the start time in clock ticks since boot, read with one ``read`` of
    ``/proc/<pid>/stat`` (this is on the hot path of every lease);
    elsewhere psutil's creation time.  Raises ``OSError`` when it cannot
    tell (out of file descriptors, say): that is not a death.
    """
    if pid <= 0:
        return None
    if HAVE_PROC_STAT:
        try:
            stat = _read_small(f"/proc/{pid}/stat")
        except (FileNotFoundError, ProcessLookupError):
            return None
        # Fields after the command name, which may itself contain ')'.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if fields[0] in (b"Z", b"X"):  # zombie or dead: gone for our purposes
            return None
        return float(fields[19])
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except psutil.NoSuchProcess:
        return None
    except psutil.Error as err:
        raise OSError(f"cannot read process {pid}: {err}") from None


def is_alive(pid: int, start: float | None) -> bool:
    """Whether the process ``pid`` that started at ``start`` still runs.

    When that cannot be told (out of file descriptors), the answer is yes:
    every caller would otherwise end a live lease or collect a live session.
    """
    try:
        now = start_time(pid)
    except OSError:
        return True
    return now is not None and (start is None or now == start)


class Process:
    """A handle on one process that survives pid reuse.

    ``open()`` returns None when the process is already gone (or the pid now
    names another process), so callers never signal or wait on a stranger.
    """

    def __init__(self, pid: int, start: float | None, pidfd: int | None) -> None:
        self.pid = pid
        self.start = start
        self._pidfd = pidfd

    @classmethod
    def open(cls, pid: int, start: float | None) -> Process | None:
        pidfd: int | None = None
        if pid <= 0:
            return None
        if HAVE_PIDFD:
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                return None
            except OSError:
                # Out of file descriptors, say: never mistake that for a
                # death; fall back to polling.
                pidfd = None
        # Checked after opening the pidfd: if the start time still matches,
        # the fd refers to the process we mean.
        if not is_alive(pid, start):
            if pidfd is not None:
                os.close(pidfd)
            return None
        return cls(pid, start, pidfd)

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def send_signal(self, sig: signal.Signals) -> None:
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            elif is_alive(self.pid, self.start):
                os.kill(self.pid, sig)
        except OSError:
            pass  # gone, or no longer ours to signal (it exec'd setuid)

    async def wait(self) -> None:
        """Return once the process has exited (zombies count as exited)."""
        if self._pidfd is not None:
            await trio.lowlevel.wait_readable(self._pidfd)
            return
        while is_alive(self.pid, self.start):
            await trio.sleep(POLL_INTERVAL)  # no pidfd here: poll

    async def wait_or_timeout(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; True if the process exited."""
        with trio.move_on_after(timeout):
            await self.wait()
            return True
        return not is_alive(self.pid, self.start)


HolderKey = tuple[int, float | None]


class HolderWatches:
    """One task and one pidfd per holder process, not per lease: a holder
    with a thousand leases costs what a holder with one does.

    ``on_exit(key)`` runs when a watched process exits; ``remove(key)``
    stops watching (its last lease ended first).
    """

    def __init__(self, on_exit: Callable[[HolderKey], Awaitable[None]]) -> None:
        self.on_exit = on_exit
        self.scopes: dict[HolderKey, trio.CancelScope] = {}

    def add(self, nursery: trio.Nursery, key: HolderKey) -> None:
        if key not in self.scopes:
            scope = self.scopes[key] = trio.CancelScope()
            nursery.start_soon(self._watch, key, scope)

    def remove(self, key: HolderKey) -> None:
        if (scope := self.scopes.pop(key, None)) is not None:
            scope.cancel()

    async def _watch(self, key: HolderKey, scope: trio.CancelScope) -> None:
        with scope:
            proc = Process.open(*key)
            if proc is not None:
                try:
                    await proc.wait()
                finally:
                    proc.close()
        if self.scopes.get(key) is scope:
            del self.scopes[key]
            await self.on_exit(key)
