"""Finding and ending a session's leftover processes.

A session's processes are recognised by their environment, not their
ancestry: a SIGKILLed actor's subactors are re-parented to init and keep
running, but they still carry the session id in ``_TRACTOR_RT_VARS``, the
environment they were exec'd with.  Their descendants go with them, also
those that carry another session's id: a session leased from inside this
one (a nested ``tractor-session lease``) is part of it and ends with it.

Scanning reads ``/proc/<pid>/environ`` of this user's processes directly,
which is several times faster than going through psutil for each one;
elsewhere psutil does the same job.
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

from tractor_session import envelope
from tractor_session.liveness import is_alive, start_time

_MARKER = envelope._TRACTOR_RT_VARS_OSENV.encode() + b"="
Match = Callable[[envelope.RuntimeVars], bool]


@dataclass(frozen=True)
class Victim:
    pid: int
    start: float
    cmdline: str


def _matching_session(value: str, match: Match) -> str | None:
    """The session id in the envelope text ``value`` if ``match`` accepts
    it; None for anything else, a hostile or garbled envelope included."""
    try:
        rtvars = envelope.load_rtvars({envelope._TRACTOR_RT_VARS_OSENV: value})
    except envelope.EnvelopeError:
        return None
    return rtvars._session_uuid if rtvars._session_uuid is not None and match(rtvars) else None


def _envelope_in(environ: bytes) -> str | None:
    for entry in environ.split(b"\0"):
        if entry.startswith(_MARKER):
            try:
                return entry[len(_MARKER):].decode()
            except UnicodeDecodeError:
                return None
    return None


def _linux_marked(needle: bytes, match: Match) -> dict[int, str]:
    uid = os.getuid()
    me = os.getpid()
    found: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/environ", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # A cheap byte search first: most processes carry no envelope.
        if needle not in data or (value := _envelope_in(data)) is None:
            continue
        if (sid := _matching_session(value, match)) is not None:
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


def _with_descendants(marked: dict[int, str]) -> dict[str, list[Victim]]:
    uid = os.getuid()
    me = os.getpid()
    groups: dict[str, list[Victim]] = {}
    seen: set[int] = set()
    for pid, sid in marked.items():
        try:
            top = psutil.Process(pid)
            family = [top, *top.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in family:
            if proc.pid in seen or proc.pid == me:
                continue
            try:
                if proc.uids().real != uid:
                    continue
                start = start_time(proc.pid)
                if start is None:
                    continue
                victim = Victim(proc.pid, start, " ".join(proc.cmdline()) or proc.name())
            except (psutil.Error, OSError):
                continue
            seen.add(proc.pid)
            groups.setdefault(sid, []).append(victim)
    return groups


def _find(needle: str, match: Match) -> dict[str, list[Victim]]:
    if sys.platform.startswith("linux"):
        marked = _linux_marked(needle.encode(), match)
    else:
        marked = _psutil_marked(match)
    return _with_descendants(marked)


def session_processes(session_id: str) -> list[Victim]:
    """This user's processes carrying ``session_id``, with descendants."""
    return _find(session_id, lambda rv: rv._session_uuid == session_id).get(session_id, [])


def sessions_processes(session_ids: set[str]) -> dict[str, list[Victim]]:
    """Like :func:`session_processes` for many sessions in one scan."""
    if len(session_ids) == 1:
        (only,) = session_ids
        return {only: session_processes(only)}
    return _find(envelope._TRACTOR_RT_VARS_OSENV, lambda rv: rv._session_uuid in session_ids)


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


def terminate(victims: list[Victim], grace: float) -> list[tuple[Victim, str]]:
    """End ``victims`` without an event loop: SIGINT, up to ``grace`` seconds
    for them to go, then SIGKILL.  Returns each victim with the signal that
    ended it.  (The daemon does the same with pidfds, without polling.)"""
    for v in victims:
        if is_alive(v.pid, v.start):
            try:
                os.kill(v.pid, signal.SIGINT)
            except OSError:
                pass
    deadline = time.monotonic() + grace
    left = [v for v in victims if is_alive(v.pid, v.start)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [v for v in left if is_alive(v.pid, v.start)]
    for v in left:
        try:
            os.kill(v.pid, signal.SIGKILL)
        except OSError:
            pass
    killed = set(left)
    return [(v, "SIGKILL" if v in killed else "SIGINT") for v in victims]
