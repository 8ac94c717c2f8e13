"""Processes, synchronously: is one alive, which belong to a session, end them.

A process is named by its pid *and* its start time: a pid alone may have
been reused by an unrelated process since we first saw it.

A session's processes are recognised three ways, each with the
descendants of what it finds:

- by their environment: a process exec'd inside the session carries its id
  in ``_TRACTOR_RT_VARS``, even once its parent died;
- by their network namespace, for a session with a private network: the
  kernel's mark, which nothing inside can rewrite;
- by ancestry from the session's holders (:class:`Target.roots`): tractor's
  subactors rewrite their process title, which blanks the environment
  others read, and the holder is their subreaper (see
  :mod:`tractor_session.holder`), so their orphans stay its descendants.

Descendants go with what was found, also those that carry another
session's id: a session leased from inside this one (a nested
``tractor-session lease``) is part of it and ends with it.

Scanning reads ``/proc/<pid>/environ`` of this user's processes directly,
which is several times faster than going through psutil for each one;
elsewhere psutil does the same job.  Nothing cheaper tells whether a
session has processes: one that existed before the lease can ``execve``
into it (its envelope in the new environment) without creating a pid, so
every scan reads every environment.  The process tree, for descendants, is
read once per scan, and only when something was found.

No trio here: ``tractor-session gc`` without a daemon uses this module,
and the daemon calls it from worker threads.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from tractor_session import envelope, rtvars
from tractor_session.protocol import Reaped

HAVE_PROC_STAT = sys.platform.startswith("linux")


def _read_small(path: str) -> bytes:
    """One read of a small /proc file, without a buffered file object
    (several times cheaper; these run for every lease)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def start_time(pid: int) -> float | None:
    """A stamp of when ``pid`` started, or None if no such process runs.

    Only ever compared with another stamp from this function: on Linux it
    is the start time in clock ticks since boot, read with one ``read`` of
    ``/proc/<pid>/stat`` (this is on the hot path of every lease);
    elsewhere psutil's creation time.  Raises ``OSError`` when it cannot
    tell (out of file descriptors, say): that is not a death.
    """
    if pid <= 0:
        return None
    if HAVE_PROC_STAT:
        try:
            stat = _read_small(f"/proc/{pid}/stat")
        except (FileNotFoundError, ProcessLookupError):
            return None
        # Fields after the command name, which may itself contain ')'.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if fields[0] in (b"Z", b"X"):  # zombie or dead: gone for our purposes
            return None
        return float(fields[19])
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except psutil.NoSuchProcess:
        return None
    except psutil.Error as err:
        raise OSError(f"cannot read process {pid}: {err}") from None


def is_alive(pid: int, start: float | None) -> bool:
    """Whether the process ``pid`` that started at ``start`` still runs.

    When that cannot be told (out of file descriptors), the answer is yes:
    every caller would otherwise end a live lease or collect a live session.
    """
    try:
        now = start_time(pid)
    except OSError:
        return True
    return now is not None and (start is None or now == start)



_MARKER = envelope._TRACTOR_RT_VARS_OSENV.encode() + b"="
Match = Callable[[rtvars.RuntimeVars], bool]


@dataclass(frozen=True)
class Target:
    """What marks a session's processes besides its envelope."""

    roots: frozenset[int] = frozenset()
    """Live processes whose descendants belong to the session."""
    netns: int | None = None
    """The inode of the session's private network namespace."""


@dataclass(frozen=True)
class Victim:
    pid: int
    start: float
    cmdline: str


def _matching_session(value: str, match: Match) -> str | None:
    """The session id in the envelope text ``value`` if ``match`` accepts
    it; None for anything else, a hostile or garbled envelope included."""
    try:
        found = rtvars.load_rtvars({envelope._TRACTOR_RT_VARS_OSENV: value})
    except rtvars.EnvelopeError:
        return None
    return found._session_uuid if found._session_uuid is not None and match(found) else None


def _envelope_in(environ: bytes) -> bytes | None:
    for entry in environ.split(b"\0"):
        if entry.startswith(_MARKER):
            return entry[len(_MARKER):]
    return None


def _read_all(fd: int) -> bytes:
    """All of a /proc file that may be larger than one read; /proc's
    ``environ`` and ``cmdline`` stop short only at their end."""
    chunks = [os.read(fd, 65536)]
    while len(chunks[-1]) == 65536:
        chunks.append(os.read(fd, 65536))
    return b"".join(chunks)


def _linux_marked(needle: bytes, match: Match, by_netns: dict[int, str]) -> dict[int, str]:
    """Every process of this user that carries a matching envelope (or
    lives in one of ``by_netns``).  One ``open`` per process, its owner
    told by ``fstat`` of the same file; the envelope text is parsed once
    per distinct text, as a session's thousand processes share one."""
    uid = os.getuid()
    me = os.getpid()
    found: dict[int, str] = {}
    sessions: dict[bytes, str | None] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            # Fails for another user's process (unless we are root).
            fd = os.open(f"/proc/{name}/environ", os.O_RDONLY)
        except OSError:
            continue
        try:
            if os.fstat(fd).st_uid != uid:
                continue
            if by_netns and (sid := by_netns.get(os.stat(f"/proc/{name}/ns/net").st_ino)):
                found[int(name)] = sid
                continue
            data = _read_all(fd)
        except OSError:
            continue
        finally:
            os.close(fd)
        # A cheap byte search first: most processes carry no envelope.
        if needle not in data or (value := _envelope_in(data)) is None:
            continue
        if value not in sessions:
            try:
                sessions[value] = _matching_session(value.decode(), match)
            except UnicodeDecodeError:
                sessions[value] = None
        if (sid := sessions[value]) is not None:
            found[int(name)] = sid
    return found


def _psutil_marked(match: Match) -> dict[int, str]:
    uid = os.getuid()
    found: dict[int, str] = {}
    for proc in psutil.process_iter(["uids"]):
        try:
            if proc.pid == os.getpid() or proc.info["uids"].real != uid:
                continue
            value = proc.environ().get(envelope._TRACTOR_RT_VARS_OSENV)
        except (psutil.Error, AttributeError):
            continue
        if value is not None and (sid := _matching_session(value, match)) is not None:
            found[proc.pid] = sid
    return found


def _children(pid: int) -> list[int]:
    """``pid``'s children: on Linux from its threads' ``children`` files,
    a few reads rather than a walk of every process."""
    if HAVE_PROC_STAT:
        kids: list[int] = []
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                kids += map(int, _read_small(f"/proc/{pid}/task/{tid}/children").split())
        except (OSError, ValueError):
            pass
        return kids
    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def subtree(pid: int, skip: frozenset[int] = frozenset()) -> dict[int, float]:
    """``pid``'s live descendants (not ``pid``, nor ``skip`` and what is
    below it), each with its start time, so that a reused pid is told
    apart later."""
    found: dict[int, float] = {}
    todo = [c for c in _children(pid) if c not in skip]
    while todo:
        child = todo.pop()
        try:
            start = start_time(child)
        except OSError:
            continue
        if start is None or child in found:
            continue
        found[child] = start
        todo += [c for c in _children(child) if c not in skip]
    return found


def _process_table() -> tuple[dict[int, list[int]], dict[int, float]]:
    """Every live process's children, and its start time: the tree a scan
    walks, built once per scan (a walk per marked process would make a
    scan quadratic).  On Linux one read of each ``/proc/<pid>/stat``."""
    children: dict[int, list[int]] = {}
    starts: dict[int, float] = {}
    if HAVE_PROC_STAT:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                stat = _read_small(f"/proc/{name}/stat")
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2 :].split()
            if fields[0] not in (b"Z", b"X"):
                starts[int(name)] = float(fields[19])
                children.setdefault(int(fields[1]), []).append(int(name))
        return children, starts
    for proc in psutil.process_iter(["ppid", "create_time", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and proc.info["create_time"] is not None:
            starts[proc.pid] = proc.info["create_time"]
            children.setdefault(proc.info["ppid"], []).append(proc.pid)
    return children, starts


def _victim(pid: int, start: float) -> Victim | None:
    """``pid`` as a victim, if its real owner is this user."""
    uid = os.getuid()
    if HAVE_PROC_STAT:
        try:
            status = _read_small(f"/proc/{pid}/status")
            fd = os.open(f"/proc/{pid}/cmdline", os.O_RDONLY)
            try:
                cmdline = _read_all(fd)
            finally:
                os.close(fd)
        except OSError:
            return None
        owner = status.partition(b"\nUid:")[2].split(maxsplit=1)[:1]
        if owner != [str(uid).encode()]:
            return None
        name = status.partition(b"Name:")[2].partition(b"\n")[0].strip()
        shown = cmdline.rstrip(b"\0").replace(b"\0", b" ") or name
        return Victim(pid, start, shown.decode(errors="replace"))
    try:
        proc = psutil.Process(pid)
        if proc.uids().real != uid:
            return None
        return Victim(pid, start, " ".join(proc.cmdline()) or proc.name())
    except psutil.Error:
        return None


def _with_descendants(marked: dict[int, str]) -> dict[str, list[Victim]]:
    me = os.getpid()
    groups: dict[str, list[Victim]] = {}
    if not marked:
        return groups
    children, starts = _process_table()
    seen: set[int] = set()
    for top, sid in marked.items():
        family = [top]
        while family:
            pid = family.pop()
            if pid in seen or pid == me:
                continue
            seen.add(pid)
            family.extend(children.get(pid, ()))
            if (start := starts.get(pid)) is not None and (victim := _victim(pid, start)) is not None:
                groups.setdefault(sid, []).append(victim)
    return groups


def _find(needle: str, match: Match, targets: dict[str, Target] | None = None) -> dict[str, list[Victim]]:
    targets = targets or {}
    if sys.platform.startswith("linux"):
        by_netns = {t.netns: sid for sid, t in targets.items() if t.netns is not None}
        marked = _linux_marked(needle.encode(), match, by_netns)
    else:
        marked = _psutil_marked(match)
    for sid, target in targets.items():
        for root in target.roots:
            marked.setdefault(root, sid)
    return _with_descendants(marked)


def session_processes(session_id: str, target: Target | None = None) -> list[Victim]:
    """This user's processes of session ``session_id``, with descendants."""
    targets = {session_id: target} if target is not None else None
    return _find(session_id, lambda rv: rv._session_uuid == session_id, targets).get(session_id, [])


def sessions_processes(targets: dict[str, Target]) -> dict[str, list[Victim]]:
    """Like :func:`session_processes` for many sessions in one scan."""
    if len(targets) == 1:
        ((only, target),) = targets.items()
        return {only: session_processes(only, target)}
    return _find(envelope._TRACTOR_RT_VARS_OSENV, lambda rv: rv._session_uuid in targets, targets)


def session_processes_of_root(root: Path) -> dict[str, list[Victim]]:
    """This user's processes of any session whose bindspace is in ``root``,
    grouped by session id.  Sessions of other roots (another daemon's) are
    none of our business, nor are those leased with ``--no-reap``."""
    prefix = str(root) + os.sep
    return _find(
        prefix,
        lambda rv: rv._bindspace is not None
        and rv._bindspace.startswith(prefix)
        and os.sep not in rv._bindspace[len(prefix):]
        and not rv.extra.get(envelope.NO_REAP_KEY),
    )


def terminate(victims: list[Victim], grace: float) -> list[Reaped]:
    """End ``victims``: SIGINT, up to ``grace`` seconds for them to go, then
    SIGKILL, and wait (briefly) for the killed to be gone.  Returns each
    victim with the signal that ended it.  ``gc`` without a daemon calls
    it; the daemon goes on from :func:`interrupt` to freezing and killing
    what its session started meanwhile (see ``daemon.reaping``)."""
    left = interrupt(victims, grace)
    kill(left)
    killed = set(left)
    return [Reaped(v.pid, v.cmdline, "SIGKILL" if v in killed else "SIGINT") for v in victims]


def interrupt(victims: list[Victim], grace: float) -> list[Victim]:
    """SIGINT ``victims``; those still running after up to ``grace`` seconds."""
    _signal_all(victims, signal.SIGINT)
    return _wait_gone(victims, grace)


def freeze(victims: list[Victim]) -> None:
    """SIGSTOP ``victims``: a stopped process forks no more, so what a
    session starts while it is being ended can be caught up with."""
    _signal_all(victims, signal.SIGSTOP)


def kill(victims: list[Victim], timeout: float = 5.0) -> list[Victim]:
    """SIGKILL ``victims`` (stopped or not); those still there after up to
    ``timeout`` seconds (stuck in the kernel, say)."""
    _signal_all(victims, signal.SIGKILL)
    return _wait_gone(victims, timeout)


def _signal_all(victims: list[Victim], sig: signal.Signals) -> None:
    for v in victims:
        # Checked just before: a victim's pid may have been reused since.
        if is_alive(v.pid, v.start):
            try:
                os.kill(v.pid, sig)
            except OSError:
                pass  # gone, or no longer ours to signal (it exec'd setuid)


def _wait_gone(victims: list[Victim], timeout: float) -> list[Victim]:
    """Those of ``victims`` still alive after up to ``timeout`` seconds;
    polled less often as the wait grows (a thousand victims cost a read
    each per poll)."""
    deadline = time.monotonic() + timeout
    left = [v for v in victims if is_alive(v.pid, v.start)]
    delay = 0.002
    while left and time.monotonic() < deadline:
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.05)
        left = [v for v in left if is_alive(v.pid, v.start)]
    return left
