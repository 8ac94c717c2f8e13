"""The registry-port pool.

A session's registrar listens on a TCP port that must stay free for the
whole session.  Ports come from a pool that lies *outside* the kernel's
ephemeral range, so that no outgoing connection anywhere on the host can be
given one of them later, and a port is handed out only if no live lease
holds it and it binds right now on TCP, over IPv4 and IPv6.

UDP is not checked: tractor's registry is TCP only, a UDP socket on the
same number does not get in its way, and checking it let any local user
empty the pool by binding UDP ports, which needs no ``listen``.

Ports are first come, first served on a host: another user can still bind
TCP ports of the pool.  Each port found busy costs a bind attempt, so
past the first few (:data:`QUICK_TRIES`) the search runs in a worker
thread, one at a time, and gives up after :data:`SEARCH_SECONDS`; the next
grant goes on where it stopped.  A grant that finds nothing fails with
``no-free-port``, and nothing else is slowed.
"""

from __future__ import annotations

import math
import socket
import sys
import time
from collections.abc import Set as AbstractSet
from pathlib import Path

import trio

DEFAULT_POOL = range(20000, 30000)
QUICK_TRIES = 8
"""How many busy ports a grant tries on the event loop before it hands the
search to a thread (each costs a few microseconds)."""
SEARCH_SECONDS = 0.5
"""How long one grant may look for a free port (10,000 busy ports take
about 0.2 s to try)."""
_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


class PortPoolError(RuntimeError):
    """No port can be handed out (bad configuration or pool exhausted)."""


def ephemeral_range() -> range:
    """The kernel's range for outgoing connections' local ports."""
    if sys.platform.startswith("linux"):
        try:
            low, high = map(int, _EPHEMERAL_RANGE_FILE.read_text().split())
            return range(low, high + 1)
        except (OSError, ValueError):
            pass
    # IANA's dynamic range: what macOS and the BSDs use by default.
    return range(49152, 65536)


def parse_pool(spec: str) -> range:
    """Parse ``"20000-29999"`` into a range, with an error a user can act on."""
    try:
        low_s, high_s = spec.split("-")
        low, high = int(low_s), int(high_s)
    except ValueError:
        raise PortPoolError(
            f"port pool {spec!r}: expected LOW-HIGH, e.g. 20000-29999"
        ) from None
    if not 1024 <= low <= high <= 65535:
        raise PortPoolError(
            f"port pool {spec!r}: need 1024 <= LOW <= HIGH <= 65535"
        )
    return range(low, high + 1)


def describe(pool: range) -> str:
    return f"{pool.start}-{pool.stop - 1}"


class PortPool:
    """Hands out free ports round-robin and remembers who holds them.

    Round-robin, rather than lowest-first, keeps a just-released port (which
    may still have connections in TIME_WAIT) out of reuse for as long as the
    pool allows.
    """

    def __init__(self, pool: range = DEFAULT_POOL) -> None:
        eph = ephemeral_range()
        if pool.start < eph.stop and eph.start < pool.stop:
            raise PortPoolError(
                f"port pool {describe(pool)} overlaps the kernel's ephemeral"
                f" range {describe(eph)}; outgoing connections could take its"
                " ports. Pick a pool outside it (--port-pool)."
            )
        self.pool = pool
        self.held: set[int] = set()
        self._next = 0
        # One search at a time: a squatted pool costs one thread, and no
        # other search can take a port while one runs.
        self._searching = trio.Lock()

    async def take(self, seconds: float = SEARCH_SECONDS) -> int:
        """Reserve a port no lease holds and that binds right now.  Most
        often the next one does: a few tries right here, with no thread's
        round trip; then a worker thread looks on, for at most ``seconds``."""
        n = len(self.pool)
        if not self._searching.locked():
            index, tried = self._search(self.held, self._next, QUICK_TRIES, math.inf)
            self._next = (self._next + tried) % n
            if index is not None:
                return self._reserve(index)
        async with self._searching:
            index, tried = await trio.to_thread.run_sync(self._search, frozenset(self.held), self._next, n, seconds)
            self._next = (self._next + tried) % n
            if index is None:
                whole = "" if tried >= n else f" (tried {tried} of its {n} ports in {seconds:g} s)"
                raise PortPoolError(
                    f"no free port in {describe(self.pool)}{whole}: {len(self.held)} leases hold"
                    " ports and the others are bound by other programs; retry, or lease"
                    " with --tpt-proto uds, or give the daemon another --port-pool"
                )
            return self._reserve(index)

    def _reserve(self, index: int) -> int:
        port = self.pool[index]
        self.held.add(port)
        return port

    def _search(self, held: AbstractSet[int], start: int, binds: int, seconds: float) -> tuple[int | None, int]:
        """The index of the first port from ``start`` (round-robin) that is
        not ``held`` and binds, or None after ``binds`` tries or ``seconds``;
        and how many ports were looked at, that one included.  Runs in a
        worker thread, given a copy of ``held``, or briefly on the loop."""
        n = len(self.pool)
        deadline = time.monotonic() + seconds
        for i in range(n):
            index = (start + i) % n
            port = self.pool[index]
            if port in held:
                continue
            if is_free(port):
                return index, i + 1
            binds -= 1
            if binds <= 0 or time.monotonic() > deadline:
                return None, i + 1
        return None, n

    def adopt(self, port: int) -> None:
        """Mark a port held by a lease recovered from disk."""
        self.held.add(port)

    def give_back(self, port: int | None) -> None:
        if port is not None:
            self.held.discard(port)


def _binds(family: socket.AddressFamily, port: int) -> bool:
    """Whether a TCP socket binds ``port`` on every address of ``family``
    (both families for a dual-stack IPv6 one)."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.bind(("::", port))
            else:
                sock.bind(("0.0.0.0", port))
    except OSError:
        return False
    return True


def _have_ipv6() -> bool:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


_DUAL_STACK = socket.has_ipv6 and _have_ipv6()


def is_free(port: int) -> bool:
    """Whether ``port`` binds on TCP, over IPv4 and IPv6.

    A dual-stack IPv6 socket bound to ``::`` conflicts with any IPv4 or
    IPv6 binding of the port, so one bind checks both (this runs for
    every lease).
    """
    if _DUAL_STACK:
        return _binds(socket.AF_INET6, port)
    return _binds(socket.AF_INET, port)
