"""Knowing, from trio, the moment a lease's holder is gone.

On Linux a pidfd becomes readable the moment its process exits, so the
daemon learns of a holder's death at once without polling; elsewhere it
polls.  One task and one pidfd per holder *process*, not per lease: a
holder with a thousand leases costs what a holder with one does.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable

import trio

from tractor_session.procs import is_alive

POLL_INTERVAL = 0.5
HAVE_PIDFD = sys.platform.startswith("linux") and hasattr(os, "pidfd_open")

HolderKey = tuple[int, float | None]
"""A holder process: its pid and start time (a pid alone may be reused)."""


class ProcessWatch:
    """Waits for one process to exit; survives pid reuse.

    ``open()`` returns None when the process is already gone (or the pid now
    names another process), so nobody waits on a stranger.
    """

    def __init__(self, pid: int, start: float | None, pidfd: int | None) -> None:
        self.pid = pid
        self.start = start
        self._pidfd = pidfd

    @classmethod
    def open(cls, pid: int, start: float | None) -> ProcessWatch | None:
        if pid <= 0:
            return None
        pidfd: int | None = None
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

    async def wait(self) -> None:
        """Return once the process has exited (zombies count as exited)."""
        if self._pidfd is not None:
            await trio.lowlevel.wait_readable(self._pidfd)
            return
        while is_alive(self.pid, self.start):
            await trio.sleep(POLL_INTERVAL)  # no pidfd here: poll


class HolderWatches:
    """Calls ``on_exit(key)`` when a watched holder process exits;
    ``remove(key)`` stops watching (its last lease ended first)."""

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
            proc = ProcessWatch.open(*key)
            if proc is not None:
                try:
                    await proc.wait()
                finally:
                    proc.close()
        if self.scopes.get(key) is scope:
            del self.scopes[key]
            await self.on_exit(key)
