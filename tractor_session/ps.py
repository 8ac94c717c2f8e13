"""``tractor-session ps ID``: a session's processes as a tree, and its sockets.

The processes are those the daemon would reap with the session
(:mod:`tractor_session.procs` decides: its envelope, its private network,
the descendants of ``lease``, its subreaper), under the process holding
the lease: ``lease`` for a ``lease -- CMD`` session, the shell (or
``--holder-pid``) for an exported one.  Each shows its kernel name and its
command line as ``/proc/<pid>/cmdline`` has it, which is where
setproctitle writes tractor's actor names.

The sockets are the socket files in the bindspace, each with whether a
process listens on it.  That is read from the kernel's table of unix
sockets (``/proc/<pid>/net/unix``, one per network namespace), not by
connecting: an actor would see a peer that connects and hangs up, and a
look must not disturb what it looks at.  Without ``/proc`` it connects.

Not on any hot path: psutil and msgspec are imported with this module,
which only ``ps`` imports.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import psutil

from tractor_session import envelope, procs
from tractor_session.client import ClientError, Connection
from tractor_session.paths import short_name
from tractor_session.protocol import LeaseInfo, Shown

SO_ACCEPTCON = 0x10000
"""The Flags bit of a listening socket in ``/proc/net/unix``."""


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    name: str
    """The kernel's short name (``comm``), 15 bytes at most."""
    cmdline: str
    depth: int
    """How far below the top of its tree: the list is in tree order."""
    holder: bool


@dataclass(frozen=True)
class Socket:
    path: str
    listening: bool


@dataclass(frozen=True)
class Snapshot:
    lease: LeaseInfo
    processes: list[Proc]
    sockets: list[Socket]


def show(conn: Connection, lease_id: str) -> Shown:
    """The live lease ``lease_id`` names (any unique prefix: the daemon
    resolves it), with what identifies its processes."""
    reply = conn.call({"type": "show", "lease_id": lease_id}, "shown")
    try:
        return msgspec.convert(reply, Shown)
    except msgspec.ValidationError as err:
        raise ClientError("protocol", f"malformed reply to show from the daemon: {err}") from None


def snapshot(shown: Shown, daemon_pid: int) -> Snapshot:
    """What runs in the session ``shown`` and what it has bound.  The
    daemon is left out: one started from inside a session (the first
    ``tractor-session`` call there) is a descendant of its holder, and
    belongs to everyone."""
    found = _processes(shown, daemon_pid)
    return Snapshot(shown.lease, found, _sockets(shown.lease.bindspace, [p.pid for p in found]))


def _top(shown: Shown) -> tuple[int | None, bool]:
    """The process holding the lease, and whether it is a ``lease``
    process, the session's subreaper: for a ``lease -- CMD`` session the
    daemon's holder is CMD, and CMD's environment names its parent as
    its subreaper."""
    pid = shown.lease.holder_pid
    if pid is None or not procs.is_alive(pid, shown.holder_start):
        return None, False
    try:
        proc = psutil.Process(pid)
        parent = proc.ppid()
        named = proc.environ().get(envelope.SUBREAPER_ENV)
    except psutil.Error:
        return pid, False
    return (parent, True) if named == str(parent) else (pid, False)


def _processes(shown: Shown, daemon_pid: int) -> list[Proc]:
    top, subreaper = _top(shown)
    target = procs.Target(frozenset([top]) if subreaper and top is not None else frozenset(), shown.netns)
    pids = {v.pid for v in procs.session_processes(shown.lease.lease_id, target)} - {daemon_pid}
    if top is not None:
        pids.add(top)
    seen: dict[int, tuple[int, str, str]] = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                name = proc.name()
                seen[pid] = (proc.ppid(), name, " ".join(proc.cmdline()) or f"[{name}]")
        except psutil.Error:
            continue  # gone since the scan
    children: dict[int | None, list[int]] = {}
    for pid, (ppid, _, _) in seen.items():
        children.setdefault(ppid if ppid in seen else None, []).append(pid)
    ordered: list[Proc] = []
    # Depth first, the holder's tree before any stray one's.
    todo = [(pid, 0) for pid in sorted(children.get(None, []), key=lambda p: (p == top, -p))]
    while todo:
        pid, depth = todo.pop()
        ppid, name, cmdline = seen[pid]
        ordered.append(Proc(pid, ppid, name, cmdline, depth, pid == top))
        todo += [(child, depth + 1) for child in sorted(children.get(pid, []), reverse=True)]
    return ordered


def _sockets(bindspace: str, pids: Iterable[int]) -> list[Socket]:
    found = []
    # os.walk follows no symlink; the bindspace is ours alone (0700).
    for directory, _, files in os.walk(bindspace):
        for name in files:
            path = os.path.join(directory, name)
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    found.append(path)
            except OSError:
                continue  # removed meanwhile
    listening = _listening(pids)
    if listening is None:
        from tractor_session.gc import socket_listened_on

        return [Socket(path, socket_listened_on(Path(path))) for path in sorted(found)]
    return [Socket(path, path in listening) for path in sorted(found)]


def _listening(pids: Iterable[int]) -> set[str] | None:
    """The paths of the listening unix sockets in the network namespaces
    of this process and ``pids`` (a socket bound in a private network is
    listed only in that network's table); None without ``/proc``."""
    if not procs.HAVE_PROC_STAT:
        return None
    namespaces: set[int] = set()
    paths: set[str] = set()
    for pid in ("self", *pids):
        try:
            netns = os.stat(f"/proc/{pid}/ns/net").st_ino
            if netns in namespaces:
                continue
            with open(f"/proc/{pid}/net/unix", "rb") as table:
                lines = table.read().splitlines()[1:]
        except OSError:
            continue  # gone, or not ours to read
        namespaces.add(netns)
        for line in lines:
            # Num RefCount Protocol Flags Type St Inode Path
            fields = line.split(None, 7)
            if len(fields) == 8 and int(fields[3], 16) & SO_ACCEPTCON:
                paths.add(os.fsdecode(fields[7]))
    return paths


def render(found: Snapshot) -> str:
    """The snapshot for people: a process tree, then the sockets."""
    lease = found.lease
    lines = [
        f"session {short_name(lease.lease_id)}: net {lease.net}, registry"
        f" {envelope.show_registry(lease.transport, lease.registry_addr)}, bindspace {lease.bindspace}"
    ]
    if found.processes:
        lines.append(f"{'PID':>8}  {'NAME':15}  COMMAND")
        for proc, branch in zip(found.processes, _branches(found.processes), strict=True):
            holder = "   (holds the lease)" if proc.holder else ""
            # One line, whatever the arguments hold (`python -c` scripts span lines).
            command = " ".join(proc.cmdline.split())
            lines.append(f"{proc.pid:>8}  {proc.name:15.15}  {branch}{command}{holder}")
    else:
        lines.append("no processes")
    if not found.sockets:
        lines.append("no sockets in the bindspace")
        return "\n".join(lines)
    lines.append("sockets:")
    for sock in found.sockets:
        state = "listening" if sock.listening else "nobody listens"
        lines.append(f"  {state:14}  {os.path.relpath(sock.path, lease.bindspace)}")
    return "\n".join(lines)


def _branches(ordered: list[Proc]) -> list[str]:
    """The tree drawing before each process's command, from the depths of
    a depth-first list: a process is the last of its siblings when no
    later one at its depth comes before its parent's next sibling."""
    last = []
    for i, proc in enumerate(ordered):
        after = next((p.depth for p in ordered[i + 1:] if p.depth <= proc.depth), -1)
        last.append(after < proc.depth)
    branches = []
    follows: list[bool] = []  # by depth, for the current ancestors: is a sibling still to come?
    for proc, is_last in zip(ordered, last, strict=True):
        del follows[proc.depth:]
        if proc.depth == 0:
            branches.append("")
        else:
            rails = "".join("│  " if more else "   " for more in follows[1:])
            branches.append(rails + ("└─ " if is_last else "├─ "))
        follows.append(not is_last)
    return branches
