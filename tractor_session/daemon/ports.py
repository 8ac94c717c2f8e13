"""The registry-port pool.

A session's registrar listens on a TCP port that must stay free for the
whole session.  Ports come from a pool that lies *outside* the kernel's
ephemeral range, so that no outgoing connection anywhere on the host can be
given one of them later, and a port is handed out only if no live lease
holds it and it binds right now on TCP and UDP, IPv4 and IPv6.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path

DEFAULT_POOL = range(20000, 30000)
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

    def _candidates(self) -> Iterator[int]:
        n = len(self.pool)
        for i in range(n):
            yield self.pool[(self._next + i) % n]

    def take(self) -> int:
        """Reserve a port no lease holds and that binds right now."""
        for port in self._candidates():
            if port in self.held or not is_free(port):
                continue
            self.held.add(port)
            self._next = (self.pool.index(port) + 1) % len(self.pool)
            return port
        raise PortPoolError(
            f"no free port in {describe(self.pool)}: {len(self.held)} leases"
            " hold ports and the rest are in use by other programs"
        )

    def adopt(self, port: int) -> None:
        """Mark a port held by a lease recovered from disk."""
        self.held.add(port)

    def give_back(self, port: int) -> None:
        self.held.discard(port)


def _binds(family: socket.AddressFamily, kind: socket.SocketKind, port: int, v6only: bool) -> bool:
    try:
        with socket.socket(family, kind) as sock:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
                sock.bind(("::", port))
            else:
                sock.bind(("0.0.0.0", port))
    except OSError:
        return False
    return True


def _have_ipv6() -> bool:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
    except OSError:
        return False
    return True


_DUAL_STACK = socket.has_ipv6 and _have_ipv6()


def is_free(port: int) -> bool:
    """Whether ``port`` binds on TCP and UDP, over IPv4 and IPv6.

    A dual-stack IPv6 socket bound to ``::`` conflicts with any IPv4 or
    IPv6 binding of the port, so two binds check all four combinations
    (this runs for every lease).
    """
    if _DUAL_STACK:
        return all(
            _binds(socket.AF_INET6, kind, port, v6only=False)
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM)
        )
    return all(
        _binds(socket.AF_INET, kind, port, v6only=False)
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM)
    )
