"""What bounds a lease: the process holding it, and its ttl.

:class:`Peer` is the process at the other end of a connection,
:func:`check_holder` vets a holder pid a client names, and
:func:`bound_by` is the process a lease's record says to watch.  :class:`Expiries`
is one timer for every ttl.

On Linux a pidfd becomes readable the moment its process exits, so the
daemon learns of a holder's death at once without polling; elsewhere it
polls.  One task and one pidfd per holder *process*, not per lease: a
holder with a thousand leases costs what a holder with one does.
"""

from __future__ import annotations

import functools
import heapq
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable

import psutil
import trio

from tractor_session.daemon.table import LeaseError
from tractor_session.procs import is_alive, start_time
from tractor_session.records import LeaseRecord

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


def bound_by(record: LeaseRecord) -> HolderKey:
    """The process whose death ends a lease that no connection of this
    daemon holds: its runner (the ``lease`` process of ``lease -- CMD``,
    which releases when CMD ends) if it has one, else its holder."""
    if record.runner_pid is not None:
        return (record.runner_pid, record.runner_start)
    return (record.holder_pid or 0, record.holder_start)


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


class Peer:
    """The process at the other end of a connection.  Its start time is
    read once, on its first connection-held lease."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def lineage(self) -> frozenset[int]:
        """The peer and its ancestors."""
        try:
            proc = psutil.Process(self.pid)
            return frozenset([self.pid, *(p.pid for p in proc.parents())])
        except psutil.Error:
            return frozenset([self.pid])

    @functools.cached_property
    def start(self) -> float | None:
        # The pid is unknown (0) on macOS and across pid namespaces: then
        # only the connection bounds its leases.
        return start_time(self.pid) if self.pid > 0 else None


def describe(pid: int) -> str:
    """A process as a log line or an error names it: pid and command, the
    program by its name rather than its (often long) path."""
    try:
        program, *args = psutil.Process(pid).cmdline()
    except (psutil.Error, ValueError):
        return f"pid {pid}"
    return f"pid {pid} ({' '.join([os.path.basename(program), *args])[:80]})"


def check_holder(pid: int) -> float:
    """Validate a holder pid named by a client; return its start time."""
    if pid <= 1:
        raise LeaseError("bad-holder", f"holder pid {pid} is not allowed: pick the process whose life bounds the lease")
    start = start_time(pid)
    if start is None:
        raise LeaseError("bad-holder", f"holder pid {pid} does not exist")
    try:
        uid = psutil.Process(pid).uids().real
    except psutil.Error:
        raise LeaseError("bad-holder", f"holder pid {pid} does not exist") from None
    if uid != os.getuid():
        raise LeaseError("bad-holder", f"holder pid {pid} belongs to uid {uid}, not to you")
    return start


class Expiries:
    """One task for every ttl: it sleeps until the earliest expiry, or
    until a grant or renewal brings an earlier one.

    One expiry per lease: a renewal replaces it and an ended lease's is
    dropped, so what this keeps follows the live leases, not how many came
    and went.  Replaced entries stay in the heap until they surface (no
    heap removes from its middle cheaply); once they outnumber the live
    ones, the heap is rebuilt from the live expiries alone."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}  # lease id -> its one current expiry
        self._changed = trio.Event()

    def __len__(self) -> int:
        """Entries held, replaced ones included: at most about twice the
        number of leases with a ttl."""
        return len(self._heap)

    def add(self, expires: float, lease_id: str) -> None:
        """Set ``lease_id``'s expiry, replacing any earlier one."""
        self._due[lease_id] = expires
        heapq.heappush(self._heap, (expires, lease_id))
        self._compact()
        self._changed.set()

    def discard(self, lease_id: str) -> None:
        """Forget ``lease_id``'s expiry (its lease ended)."""
        if self._due.pop(lease_id, None) is not None:
            self._compact()

    def _compact(self) -> None:
        if len(self._heap) > 2 * len(self._due) + 64:
            self._heap = [(expires, lease_id) for lease_id, expires in self._due.items()]
            heapq.heapify(self._heap)

    async def run(self, expired: Callable[[str, float], None]) -> None:
        while True:
            now = time.time()
            while self._heap and self._heap[0][0] <= now:
                expires, lease_id = heapq.heappop(self._heap)
                if self._due.get(lease_id) == expires:
                    del self._due[lease_id]
                    expired(lease_id, now)
            self._changed = trio.Event()
            with trio.move_on_after(self._heap[0][0] - now if self._heap else math.inf):
                await self._changed.wait()
