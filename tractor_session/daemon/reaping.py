"""Ending a session's leftover processes, and sweeping dead sessions' garbage, from trio.

Finding them reads every process of the user, so when a thousand leases
end at once (their holder died, a daemon restarted) they share one scan
instead of queueing for a thousand: :class:`LeftoverScanner` batches the
requests that arrive while a scan runs into the next one.  Scanning and
ending run in worker threads (:mod:`tractor_session.procs` is synchronous),
so the event loop keeps serving everyone else meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tractor_session import gc, procs
from tractor_session.procs import Target, Victim
from tractor_session.protocol import GcItem, Reaped

# Each reap waits out a grace period in its own thread; many sessions may
# end at once, and trio's default limit (40) would queue them behind
# each other's grace periods.
_REAPERS = trio.CapacityLimiter(512)


async def reap(victims: list[Victim], grace: float) -> list[Reaped]:
    """SIGINT ``victims``, then SIGKILL what remains after ``grace``."""
    if not victims:
        return []
    return await trio.to_thread.run_sync(
        procs.terminate, victims, grace, limiter=_REAPERS, abandon_on_cancel=True
    )


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
    root: Path, grace: float, live_bindspaces: Callable[[], dict[str, str]], reap_grace: float,
    dry_run: bool = False,
) -> list[GcItem]:
    """Find (and unless ``dry_run``, remove) what dead sessions left under
    ``root``: the scan runs in a thread, then ``live_bindspaces()`` (lease
    id -> bindspace) is asked which sessions are live *now*, and those are
    spared."""
    findings = await trio.to_thread.run_sync(gc.scan, root, grace)
    live = live_bindspaces()
    live_names = {Path(bindspace).name for bindspace in live.values()}
    findings.processes = {sid: v for sid, v in findings.processes.items() if sid not in live}
    findings.bindspaces = [i for i in findings.bindspaces if Path(i.path).name not in live_names]
    if dry_run:
        return findings.items()
    reaped = await reap(findings.victims(), reap_grace)
    removed = await trio.to_thread.run_sync(gc.remove, root, findings.bindspaces + findings.sockets)
    return findings.reaped_items(reaped) + removed
