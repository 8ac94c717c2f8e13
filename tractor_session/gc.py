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

Everything is done relative to the root's fd (:mod:`tractor_session.rootdir`),
so a root swapped for a link mid-run leads nowhere new.  No trio:
``tractor-session gc`` runs this directly when no daemon runs, and the
daemon from a worker thread.  Records (msgspec) and processes
(psutil) are imported when a scan starts, not with the module.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tractor_session import paths
from tractor_session.rootdir import RootDir, remove_bindspace

TYPE_CHECKING = False  # see client.py
if TYPE_CHECKING:
    from tractor_session.procs import Victim
    from tractor_session.protocol import GcItem, Reaped

DEFAULT_GRACE = 300.0
DEFAULT_REAP_GRACE = 3.0
_ACTOR_SOCKET_RE = re.compile(r"(.+)@(\d+)\.sock")


@dataclass
class Findings:
    bindspaces: list[GcItem] = field(default_factory=list)
    sockets: list[GcItem] = field(default_factory=list)
    # session id -> its leftover processes
    processes: dict[str, list[Victim]] = field(default_factory=dict)
    # The grace the scan judged bindspaces by, and each one's inode and
    # ctime then: :func:`remove` judges again one that changed since.
    grace: float = DEFAULT_GRACE
    stamps: dict[str, tuple[int, int]] = field(default_factory=dict)

    def process_item(self, pid: int, cmdline: str, ended_by: str | None = None) -> GcItem:
        """The report line of one leftover process (``ended_by`` a signal
        once it was reaped)."""
        from tractor_session.protocol import GcItem

        sid = next(sid for sid, victims in self.processes.items() if any(v.pid == pid for v in victims))
        how = f"; ended by {ended_by}" if ended_by else ""
        return GcItem("process", f"pid {pid}: {cmdline[:120]}", f"session {sid} has no live lease{how}")

    def victims(self) -> list[Victim]:
        return [v for victims in self.processes.values() for v in victims]

    def reaped_items(self, reaped: list[Reaped]) -> list[GcItem]:
        return [self.process_item(r.pid, r.cmdline, r.signal) for r in reaped]

    def items(self) -> list[GcItem]:
        procs = [self.process_item(v.pid, v.cmdline) for victims in self.processes.values() for v in victims]
        return [*procs, *self.bindspaces, *self.sockets]


def _bindspace_verdict(
    root: RootDir, name: str, st: os.stat_result, grace: float, now: float, session_id: str | None = None
) -> str | None:
    """Why the directory ``name`` is garbage (for ``session_id``'s processes,
    if given), or None if it must stay."""
    from tractor_session.procs import is_alive
    from tractor_session.records import QUARANTINED_NAME, BadRecord, read_bindspace_record

    try:
        record = read_bindspace_record(root, name)
        why_none = "no lease record"
    except BadRecord as bad:
        record, why_none = None, f"an invalid lease record ({bad})"
    if record is None:
        age = now - st.st_mtime
        if age < grace:
            return None
        if root.has(f"{name}/{QUARANTINED_NAME}"):
            why_none = "its lease record was quarantined as invalid"
        return f"{why_none} and {age:.0f} s old"
    if session_id is not None and record.lease_id != session_id:
        return "its name belongs to another session now"
    if record.expires is not None and record.expires <= now:
        return "its lease expired"
    if record.runner_pid is not None and not is_alive(record.runner_pid, record.runner_start):
        # ``lease -- CMD``'s lease process: the lease ends with it, as with a daemon.
        return f"its lease process pid {record.runner_pid} is dead"
    if not is_alive(record.holder_pid or 0, record.holder_start):
        return f"its holder pid {record.holder_pid} is dead"
    return None


def socket_listened_on(path: str | Path) -> bool:
    """Only a refused connect proves nobody listens; any other failure
    (a full backlog, no permission, ...) keeps the socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        try:
            sock.connect(os.fspath(path))
        except ConnectionRefusedError:
            return False
        except OSError:
            return True
    return True


def _socket_verdict(root: RootDir, name: str) -> str | None:
    from tractor_session.procs import is_alive

    if socket_listened_on(root.socket_path(name)):
        return None
    # tractor names actor sockets <name>@<pid>.sock; registry@<port>.sock
    # carries a port, not a pid.
    m = _ACTOR_SOCKET_RE.fullmatch(name)
    if m and m.group(1) != "registry" and not is_alive(int(m.group(2)), None):
        return f"its binder pid {m.group(2)} is dead and nobody listens"
    return "nobody listens on it"


def scan(root: RootDir, grace: float = DEFAULT_GRACE) -> Findings:
    """Find garbage in ``root``.  A daemon drops from the findings what its
    table knows to be live; without one, the records decide."""
    from tractor_session.procs import session_processes_of_root
    from tractor_session.protocol import GcItem
    from tractor_session.records import BINDSPACE_NAME_RE

    findings = Findings(grace=grace)
    # Processes first: a lease granted after this scan cannot own one of
    # the processes it found, so checking liveness afterwards is race-free.
    for sid, victims in session_processes_of_root(Path(root.path)).items():
        if _session_is_dead(root, sid, grace):
            findings.processes[sid] = victims
    uid = os.getuid()
    now = time.time()
    with os.scandir(root.fd) as scanned:
        entries = list(scanned)
    for entry in entries:
        path = root.path_of(entry.name)
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue  # gone meanwhile, or cannot be looked at: one entry, not the scan
        if st.st_uid != uid:
            continue
        ours = BINDSPACE_NAME_RE.fullmatch(entry.name) is not None
        if ours and stat.S_ISLNK(st.st_mode):
            findings.bindspaces.append(GcItem("symlink", path, "a symlink named like a bindspace"))
        elif ours and stat.S_ISDIR(st.st_mode):
            try:
                why = _bindspace_verdict(root, entry.name, st, grace, now)
            except OSError:
                continue  # its record cannot be read right now: keep it
            if why:
                findings.bindspaces.append(GcItem("bindspace", path, why))
                findings.stamps[path] = (st.st_ino, st.st_ctime_ns)
        elif stat.S_ISSOCK(st.st_mode) and (why := _socket_verdict(root, entry.name)):
            findings.sockets.append(GcItem("socket", path, why))
    return findings


def _session_is_dead(root: RootDir, session_id: str, grace: float) -> bool:
    """Whether no bindspace of ``session_id`` is live.  Bindspace names are
    short and get reused: a directory of the name whose record names
    another session does not keep this one alive."""
    now = time.time()
    for name in paths.bindspace_names(session_id):
        try:
            st = root.lstat(name)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            continue
        try:
            if _bindspace_verdict(root, name, st, grace, now, session_id) is None:
                return False
        except OSError:
            return False  # cannot tell: spare it
    return True


def remove(root: RootDir, findings: Findings) -> list[GcItem]:
    """Remove the bindspaces, links and sockets :func:`scan` found; return
    what was actually removed."""
    removed: list[GcItem] = []
    for item in [*findings.bindspaces, *findings.sockets]:
        parent, _, name = item.path.rpartition("/")
        if parent != root.path:
            continue  # never anything outside the root
        try:
            st = root.lstat(name)
        except FileNotFoundError:
            continue
        try:
            if stat.S_ISDIR(st.st_mode) and item.kind == "bindspace":
                # Names come back: since the scan (a reap grace ago, in a
                # daemon's sweep) this one may have gone to a new session,
                # whose directory is new (its ctime is) and is judged again.
                changed = findings.stamps.get(item.path) != (st.st_ino, st.st_ctime_ns)
                if changed and _bindspace_verdict(root, name, st, findings.grace, time.time()) is None:
                    continue
                remove_bindspace(root.fd, name)
            elif stat.S_ISLNK(st.st_mode):
                os.unlink(name, dir_fd=root.fd)
            elif stat.S_ISSOCK(st.st_mode):
                # Checked again: someone may have bound it since the scan.
                if socket_listened_on(root.socket_path(name)):
                    continue
                os.unlink(name, dir_fd=root.fd)
            else:
                continue
        except OSError:
            # Gone already, or swapped for something else mid-way: leave it
            # to the next sweep rather than abort this one.
            continue
        removed.append(item)
    return removed


def collect_without_daemon(root: Path, dry_run: bool, grace: float | None = None) -> list[GcItem]:
    """``tractor-session gc`` when no daemon runs: trust the on-disk records
    and holder liveness.  Raises ``BusyError`` if a daemon holds the root."""
    if not os.path.lexists(root):
        return []
    paths.check_private_dir(root)
    control = Path(paths.control_dir(root))
    paths.ensure_private_dir(control)
    # No daemon may start meanwhile (clients wait on the spawn lock), and
    # none may be running unseen (it would hold the daemon lock).
    with _flock(control / "spawn.lock", block=True), _flock(control / "daemon.lock", block=False) as free:
        if not free:
            raise BusyError("a daemon holds this root but did not answer; retry `tractor-session gc`")
        with RootDir.open(root) as opened:
            findings = scan(opened, DEFAULT_GRACE if grace is None else grace)
            if dry_run:
                return findings.items()
            from tractor_session.procs import terminate

            reaped = terminate(findings.victims(), DEFAULT_REAP_GRACE)
            return findings.reaped_items(reaped) + remove(opened, findings)


class BusyError(RuntimeError):
    pass


@contextlib.contextmanager
def _flock(path: Path, block: bool) -> Iterator[bool]:
    """Hold an flock on ``path``; yields whether it was taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if block else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
