"""What ends the daemon: SIGTERM or SIGINT, a ``stop`` request, or, with
``--exit-when-idle``, a stretch with no live lease and no client connected.

Every way out is the same clean stop (:func:`.main._run`): everything is
cancelled and every live lease stays on disk for the next daemon.

The idle clock is one task that sleeps until its deadline.  Whatever can
keep the daemon busy (a connection, a lease) calls :meth:`Lifetime.changed`
when it begins or ends; the task wakes, and starts the clock again from
zero if the daemon is idle, or waits for the next change if it is not.
Nothing polls.  A daemon started on demand gets the option (see
:mod:`tractor_session.autostart`); one run by hand or by systemd does not,
unless told.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable

import trio


class Lifetime:
    def __init__(self, exit_when_idle: float | None) -> None:
        self.exit_when_idle = exit_when_idle
        self.reason: str | None = None
        self._stop = trio.Event()
        self._changed = trio.Event()

    def stop(self, reason: str) -> None:
        """Stop the daemon; ``reason`` (the first one given) completes
        "stopping ..." in its log."""
        if self.reason is None:
            self.reason = reason
            self._stop.set()

    def changed(self) -> None:
        """A connection or a lease began or ended: the idle clock starts
        over, or stops while the daemon is busy."""
        self._changed.set()

    async def wait(self, signals: AsyncIterator[int], is_idle: Callable[[], bool]) -> str:
        """Return why the daemon stops, once something stops it.
        ``is_idle()``: no live lease and no client connected."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._on_signal, signals)
            if self.exit_when_idle is not None:
                nursery.start_soon(self._exit_when_idle, self.exit_when_idle, is_idle)
            await self._stop.wait()
            nursery.cancel_scope.cancel()
        assert self.reason is not None
        return self.reason

    async def _on_signal(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            self.stop(f"on {signal.Signals(signum).name}")
            return

    async def _exit_when_idle(self, limit: float, is_idle: Callable[[], bool]) -> None:
        while True:
            # No checkpoint between a fresh event and the check: no change
            # can slip in unseen.
            self._changed = trio.Event()
            if not is_idle():
                await self._changed.wait()
                continue
            with trio.move_on_after(limit) as clock:
                await self._changed.wait()
            if clock.cancelled_caught:
                self.stop(f"after {limit:g} s idle (--exit-when-idle)")
                return
