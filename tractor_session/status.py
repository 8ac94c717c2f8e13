"""How ``tractor-session status`` shows leases to people.

The table fits 100 columns: one line per lease, short ids (the bindspace
name, which every command accepts, as any unique prefix of an id), child
leases (an xdist worker's, or a ``lease`` run inside another session)
indented under their parent, and the holder's command read from ``/proc``
here, in the client, so the daemon's replies stay small.  ``status ID``
shows everything about one lease.
"""

from __future__ import annotations

import time

from tractor_session import envelope
from tractor_session.paths import short_name

TYPE_CHECKING = False  # see client.py
if TYPE_CHECKING:
    from tractor_session.protocol import LeaseInfo, Status

WIDTH = 100


def table(status: Status) -> str:
    """The daemon and its live leases, children under their parents."""
    lines = [f"daemon pid {status.daemon_pid}, root {status.root}: {len(status.leases)} live lease(s)"]
    if not status.leases:
        return lines[0]
    header = f"{'ID':16}  {'AGE':>5}  {'EXPIRES':>7}  {'NET':7}  {'REGISTRY':22}  "
    lines.append(header + "HOLDER")
    live = {info.lease_id for info in status.leases}
    children: dict[str | None, list[LeaseInfo]] = {}
    for info in sorted(status.leases, key=lambda i: i.created):
        children.setdefault(info.parent if info.parent in live else None, []).append(info)

    def add(info: LeaseInfo, depth: int) -> None:
        name = ("  " * (depth - 1) + "└ " if depth else "") + short_name(info.lease_id)
        row = (
            f"{name:16}  {_duration(time.time() - info.created):>5}  {_expires(info):>7}  {info.net:7}"
            f"  {_registry(info):22}  "
        )
        lines.append(row + _holder(info)[: max(10, WIDTH - len(row))])
        for child in children.get(info.lease_id, []):
            add(child, depth + 1)

    for info in children.get(None, []):
        add(info, 0)
    return "\n".join(lines)


def details(info: LeaseInfo, children: list[str]) -> str:
    """Everything about one lease, a field a line."""
    registry = envelope.show_registry(info.transport, info.registry_addr)
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created))
    if info.expires is None:
        expires = "never (it lasts as long as its holder)"
    else:
        at = time.strftime("%H:%M:%S", time.localtime(info.expires))
        expires = f"{at} (in {_expires(info)}; `tractor-session renew` extends it)"
    fields = [
        ("lease", info.lease_id),
        ("bindspace", info.bindspace),
        ("transport", info.transport),
        ("registry", registry),
        ("network", "private (a network of the session's own)" if info.net == "private" else "host"),
        ("holder", _holder(info)),
        ("created", f"{created} ({_duration(time.time() - info.created)} ago)"),
        ("expires", expires),
        ("parent", info.parent or "-"),
        ("children", ", ".join(short_name(c) for c in children) or "-"),
        ("leftovers", "reaped when it ends" if info.reap else "left running (--no-reap)"),
    ]
    return "\n".join(f"{name:10} {value}" for name, value in fields)


def _duration(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


def _expires(info: LeaseInfo) -> str:
    return "-" if info.expires is None else _duration(info.expires - time.time())


def _registry(info: LeaseInfo) -> str:
    """tcp: the address; uds: the socket's name (its directory is the
    bindspace's, which ``status ID`` shows)."""
    if info.transport == "tcp":
        return envelope.show_registry(info.transport, info.registry_addr)
    return f"uds {info.registry_addr[1]}"


def _holder(info: LeaseInfo) -> str:
    """The holder's pid and command line, as ``/proc`` tells them."""
    if info.holder_pid is None:
        return "- (its client's connection)"
    try:
        with open(f"/proc/{info.holder_pid}/cmdline", "rb") as f:
            # One line, whatever the arguments hold (`python -c` scripts
            # span lines).
            command = " ".join(f.read().decode(errors="replace").replace("\0", " ").split())
    except OSError:
        command = ""
    return f"{info.holder_pid} {command}" if command else str(info.holder_pid)
