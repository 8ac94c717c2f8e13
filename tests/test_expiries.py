"""The daemon's ttl clock keeps what the live leases need, not their
history: a lease that ended, or an expiry a renewal replaced, leaves
nothing behind, however many came and went.  (The daemon's RSS over 20k
ttl leases and renewals is the benchmark's figure:
``scripts/bench.py --only ttl``.)

The clock is driven directly, under trio, with real time: what it holds
cannot be seen from outside a daemon but through its RSS."""

from __future__ import annotations

import time

import pytest
import trio

from tractor_session.daemon.holders import Expiries

MANY = 20_000
DAY = 86400.0


@pytest.mark.trio
async def test_ended_and_renewed_leases_leave_nothing_behind() -> None:
    expiries = Expiries()
    fired: list[str] = []
    soon_fired = trio.Event()

    def expired(lease_id: str, _now: float) -> None:
        fired.append(lease_id)
        if lease_id == "soon":
            soon_fired.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(expiries.run, expired)
        later = time.time() + DAY
        for i in range(MANY):   # granted with a ttl, then released
            expiries.add(later, f"ended-{i}")
            expiries.discard(f"ended-{i}")
        assert len(expiries) <= 100
        for i in range(MANY):   # one lease renewed over and over
            expiries.add(later + i, "renewed")
        assert len(expiries) <= 100

        # Still a clock: the replaced expiry of a renewed lease never fires,
        # a due one does, once.
        expiries.add(time.time() + 0.05, "renewed-later")
        expiries.add(later, "renewed-later")
        expiries.add(time.time() + 0.1, "soon")
        with trio.fail_after(5):
            await soon_fired.wait()
        nursery.cancel_scope.cancel()
    assert fired == ["soon"]
