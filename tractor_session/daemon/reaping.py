"""Ending a session's leftover processes, and sweeping dead sessions' garbage, from trio.

Finding them reads every process of the user, so when a thousand leases
end at once (their holder died, a daemon restarted) they share one scan
instead of queueing for a thousand: :class:`LeftoverScanner` batches the
requests that arrive while a scan runs into the next one.  Scanning and
ending run in worker threads (:mod:`tractor_session.procs` is synchronous),
so the event loop keeps serving everyone else meanwhile.

Ending is not one scan and one kill: a session's processes may start
others while they are being ended (during the SIGINT grace, or between a
scan and the kill), and those would outlive the session.
:func:`end_processes` freezes and scans again until nothing of the session
runs, then kills, and scans once more.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, TypeVarTuple, Unpack

import trio

from tractor_session import gc, paths, procs
from tractor_session.procs import Target, Victim
from tractor_session.protocol import GcItem, Reaped
from tractor_session.rootdir import RootDir

log = logging.getLogger("tractor_session.daemon")

# Each reap waits out a grace period in its own thread; many sessions may
# end at once, and trio's default limit (40) would queue them behind
# each other's grace periods.
_REAPERS = trio.CapacityLimiter(512)


# How many freeze-or-kill passes before a session's processes are declared
# unkillable (forking faster than scans find them).
MAX_PASSES = 50

Finder = Callable[[], Awaitable[list[Victim]]]
_Key = tuple[int, float]
_R = TypeVar("_R")
_Args = TypeVarTuple("_Args")


async def _in_thread(fn: Callable[[Unpack[_Args]], _R], *args: *_Args) -> _R:
    """``fn(*args)`` in a worker thread, each with its own (waits out a grace)."""
    return await trio.to_thread.run_sync(fn, *args, limiter=_REAPERS, abandon_on_cancel=True)


async def end_processes(find: Finder, grace: float) -> list[Reaped]:
    """End every process ``find()`` reports, and what they start while
    being ended; return once a scan finds none left.

    SIGINT first, and up to ``grace`` seconds to go.  What still runs then,
    and what was started meanwhile (a shell ignoring SIGINT keeps forking),
    is frozen with SIGSTOP, scan after scan, until a scan finds nothing of
    the session still running: a stopped process starts nothing, and its
    children stay its children, found with it.  Then all of them are
    SIGKILLed at once, and the next scan must find nothing.  Raises
    ``RuntimeError`` when a process outlives SIGKILL or processes outlast
    :data:`MAX_PASSES` passes, so that the caller keeps the session's port
    and directory; never leaves a process stopped, cancelled or not."""
    victims = await find()
    if not victims:
        return []
    ended = {_key(v): Reaped(v.pid, v.cmdline, "SIGINT") for v in victims}
    # Still running after the grace: also the orphans of those that went,
    # which a scan no longer finds when they carry no envelope.
    left = await _in_thread(procs.interrupt, victims, grace)
    frozen: dict[_Key, Victim] = {}
    try:
        for _ in range(MAX_PASSES):
            running = {_key(v): v for v in [*left, *await find()] if _key(v) not in frozen}
            left = []
            if running:
                # Counted before the signals go out: cancelled meanwhile,
                # the finally below still kills them rather than leave them stopped.
                frozen.update(running)
                await _in_thread(procs.freeze, list(running.values()))
            elif frozen:
                stuck = await _in_thread(procs.kill, list(frozen.values()))
                ended.update((k, Reaped(v.pid, v.cmdline, "SIGKILL")) for k, v in frozen.items())
                frozen.clear()
                if stuck:
                    # SIGKILLed and still there: in the kernel, where more passes do not reach.
                    raise RuntimeError(
                        f"{len(stuck)} processes of the session outlived SIGKILL (stuck in the kernel?): "
                        + ", ".join(f"{v.pid} {v.cmdline[:40]!r}" for v in stuck[:5])
                    )
            else:
                return list(ended.values())
    finally:
        if frozen:
            procs.kill(list(frozen.values()), timeout=0)
    raise RuntimeError(
        f"processes of the session outlasted {MAX_PASSES} passes of SIGSTOP and SIGKILL"
        " (forking faster than the scans find them); see `tractor-session ps`"
    )


def _key(victim: Victim) -> _Key:
    return victim.pid, victim.start


class LeftoverScanner:
    """Finds sessions' leftover processes, many sessions per scan."""

    def __init__(self) -> None:
        self._lock = trio.Lock()
        self._batch = _ScanBatch()

    async def find(self, session_id: str, target: Target) -> list[Victim]:
        batch = self._batch
        batch.targets[session_id] = target
        if not batch.started:
            batch.started = True
            try:
                async with self._lock:
                    # From here on, new requests go to the next batch.
                    self._batch = _ScanBatch()
                    batch.found = await trio.to_thread.run_sync(procs.sessions_processes, batch.targets)
            except Exception as err:
                batch.error = err
                raise
            finally:
                batch.done.set()
        await batch.done.wait()
        if batch.error is not None:
            raise RuntimeError(f"scanning for leftover processes failed: {batch.error!r}")
        return batch.found.get(session_id, [])


@dataclass
class _ScanBatch:
    targets: dict[str, Target] = field(default_factory=dict)
    started: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    found: dict[str, list[Victim]] = field(default_factory=dict)
    error: Exception | None = None


async def collect_garbage(
    root: RootDir, grace: float, live_bindspaces: Callable[[], dict[str, str]], reap_grace: float,
    dry_run: bool = False,
) -> list[GcItem]:
    """Find (and unless ``dry_run``, remove) what dead sessions left under
    ``root``: the scan runs in a thread, then ``live_bindspaces()`` (lease
    id -> bindspace name) is asked which sessions are live *now*, and those are
    spared."""
    findings = await trio.to_thread.run_sync(gc.scan, root, grace)
    live = live_bindspaces()
    live_names = set(live.values())
    findings.processes = {sid: v for sid, v in findings.processes.items() if sid not in live}
    findings.bindspaces = [i for i in findings.bindspaces if Path(i.path).name not in live_names]
    if dry_run:
        return findings.items()
    dead = set(findings.processes)

    async def find() -> list[Victim]:
        # What a dead session started meanwhile is found too, and reported with it.
        found = await trio.to_thread.run_sync(procs.session_processes_of_root, Path(root.path))
        for sid in dead & found.keys():
            known = {_key(v) for v in findings.processes[sid]}
            findings.processes[sid] += [v for v in found[sid] if _key(v) not in known]
        return [v for sid in dead for v in found.get(sid, [])]

    try:
        reaped = await end_processes(find, reap_grace) if dead else []
    except RuntimeError as err:
        # One stuck session costs its own directories, not the sweep's.
        log.warning("gc: could not end the processes of %s: %s; its directory stays until then", ", ".join(dead), err)
        stuck = {name for sid in dead for name in paths.bindspace_names(sid)}
        findings.bindspaces = [i for i in findings.bindspaces if Path(i.path).name not in stuck]
        reaped = []
    removed = await trio.to_thread.run_sync(gc.remove, root, findings)
    return findings.reaped_items(reaped) + removed
