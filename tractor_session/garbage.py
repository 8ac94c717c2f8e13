"""Finding and removing what dead sessions left in the runtime root.

Three kinds of garbage:

- *bindspaces*: directories named like ours whose lease is over: their
  record names a dead holder, or they have no record and are older than a
  grace period (a lease being granted right now has no record yet);
- *sockets* directly in the runtime root, tractor's shared default
  bindspace, that nobody listens on any more (a stale ``registry@1616.sock``
  makes the next registrar fail with "Address already in use");
- *processes* of this user still carrying the id of a session of this root
  that no live lease holds.

Safety comes first: nothing outside the root, no symlink followed (a link
named like a bindspace is removed as a link), nothing another user owns,
nothing whose name is not ours, and never a listened-on socket.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from tractor_session.leases import BINDSPACE_NAME_RE, read_record
from tractor_session.liveness import is_alive
from tractor_session.protocol import GcItem, short_name
from tractor_session.reaper import Victim, session_processes_of_root

DEFAULT_GRACE = 300.0
_ACTOR_SOCKET_RE = re.compile(r"(.+)@(\d+)\.sock")


@dataclass
class Findings:
    bindspaces: list[GcItem] = field(default_factory=list)
    sockets: list[GcItem] = field(default_factory=list)
    # session id -> its leftover processes
    processes: dict[str, list[Victim]] = field(default_factory=dict)

    def process_items(self) -> list[GcItem]:
        return [
            GcItem("process", f"pid {v.pid}: {v.cmdline[:120]}", f"session {sid} has no live lease")
            for sid, victims in self.processes.items()
            for v in victims
        ]

    def items(self) -> list[GcItem]:
        return [*self.process_items(), *self.bindspaces, *self.sockets]


def _bindspace_verdict(path: Path, st: os.stat_result, grace: float, now: float) -> str | None:
    """Why the directory ``path`` is garbage, or None if it must stay."""
    record = read_record(path)
    if record is None:
        age = now - st.st_mtime
        if age < grace:
            return None
        return f"no lease record and {age:.0f} s old"
    if record.expires is not None and record.expires <= now:
        return "its lease expired"
    if not is_alive(record.holder_pid or 0, record.holder_start):
        return f"its holder pid {record.holder_pid} is dead"
    return None


def _socket_listened_on(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        try:
            sock.connect(os.fspath(path))
        except BlockingIOError:
            return True  # a listener with a full backlog is still a listener
        except OSError as err:
            if err.errno == errno.EAGAIN:
                return True
            return False
    return True


def _socket_verdict(path: Path) -> str | None:
    if _socket_listened_on(path):
        return None
    # tractor names actor sockets <name>@<pid>.sock; registry@<port>.sock
    # carries a port, not a pid.
    m = _ACTOR_SOCKET_RE.fullmatch(path.name)
    if m and m.group(1) != "registry" and not is_alive(int(m.group(2)), None):
        return f"its binder pid {m.group(2)} is dead and nobody listens"
    return "nobody listens on it"


def scan(root: Path, grace: float = DEFAULT_GRACE, live: frozenset[str] = frozenset()) -> Findings:
    """Find garbage in ``root``.  ``live`` holds ids (and bindspace names) of
    leases a daemon knows to be live: they are never garbage."""
    findings = Findings()
    # Processes first: a lease granted after this scan cannot own one of
    # the processes it found, so checking liveness afterwards is race-free.
    for sid, victims in session_processes_of_root(root).items():
        if sid not in live and _session_is_dead(root, sid, grace):
            findings.processes[sid] = victims
    uid = os.getuid()
    now = time.time()
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return findings
    for entry in entries:
        path = Path(entry.path)
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if st.st_uid != uid:
            continue
        ours = BINDSPACE_NAME_RE.fullmatch(entry.name) is not None
        if ours and stat.S_ISLNK(st.st_mode) and entry.name not in live:
            findings.bindspaces.append(GcItem("symlink", str(path), "a symlink named like a bindspace"))
        elif ours and stat.S_ISDIR(st.st_mode):
            if entry.name not in live and (why := _bindspace_verdict(path, st, grace, now)):
                findings.bindspaces.append(GcItem("bindspace", str(path), why))
        elif stat.S_ISSOCK(st.st_mode) and (why := _socket_verdict(path)):
            findings.sockets.append(GcItem("socket", str(path), why))
    return findings


def _session_is_dead(root: Path, session_id: str, grace: float) -> bool:
    bindspace = root / short_name(session_id)
    try:
        st = os.lstat(bindspace)
    except FileNotFoundError:
        return True
    if not stat.S_ISDIR(st.st_mode):
        return True
    return _bindspace_verdict(bindspace, st, grace, time.time()) is not None


def remove(root: Path, items: list[GcItem]) -> list[GcItem]:
    """Remove bindspaces, links and sockets found by :func:`scan`; return
    what was actually removed."""
    removed: list[GcItem] = []
    for item in items:
        path = Path(item.path)
        if path.parent != root:
            continue  # never anything outside the root
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        try:
            if stat.S_ISDIR(st.st_mode) and item.kind == "bindspace":
                # fd-based on Linux: a link swapped in cannot lead outside.
                shutil.rmtree(path)
            elif stat.S_ISLNK(st.st_mode) or stat.S_ISSOCK(st.st_mode):
                os.unlink(path)
            else:
                continue
        except OSError:
            # Gone already, or swapped for something else mid-way: leave it
            # to the next sweep rather than abort this one.
            continue
        removed.append(item)
    return removed
