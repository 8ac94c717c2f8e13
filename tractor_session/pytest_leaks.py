"""Leftovers named by the test that left them, and gone before the next test.

A run-wide session cannot say which test leaked an actor or a socket, and
ends leftovers only when the run is over, after they broke the tests that
followed.  So, inside the run's session (same bindspace, same registry:
nothing moves under a tractor runtime that is up), every test is a scope of
its own:

- Before a test, :class:`LeakTracker` notes the processes below pytest and
  below the session's subreaper (the ``lease`` pytest runs under, where
  orphaned subactors land), and the socket files in the bindspace.
- After its teardown, what is new, alive and not owned by a wider fixture
  is the test's leftover: ended (SIGINT, then SIGKILL after the grace, the
  session's own rules), and new socket files nobody listens on removed;
  both recorded against the test's node id.
- A process that a module- or session-scoped fixture started belongs to
  that fixture, not to the test that happened to trigger it: it may
  outlive the test, and is ended (and reported) only if it outlives the
  fixture's own teardown.

``--tractor-session-leaks=report`` only reports; ``reap`` (the default)
ends them too; ``fail`` also makes the leaking test error in teardown.
The summary lists leftovers by test, most first, and
``--tractor-session-leaks-json PATH`` writes them for CI.  Every test
also runs with ``TRACTOR_SESSION_SCOPE`` set to its node id, so whatever
it starts carries its name.

The checks are a handful of reads of ``/proc/<pid>/task/*/children`` and
one directory listing per test.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tractor_session import envelope, procs
from tractor_session.gc import socket_listened_on

MODES = ("report", "reap", "fail")
GRACE = 3.0
WORKER_KEY = "tractor_session_leftovers"


@dataclass
class Leftover:
    """What one test (or wider fixture) left behind."""

    nodeid: str
    processes: list[dict[str, Any]] = field(default_factory=list)
    sockets: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.processes) + len(self.sockets)

    def lines(self) -> list[str]:
        found = [f"  pid {p['pid']} ({p['ended_by'] or 'left running'}): {p['cmdline'][:160]}" for p in self.processes]
        return found + [f"  socket {path}" for path in self.sockets]


class LeakError(AssertionError):
    """Raised in teardown with ``--tractor-session-leaks=fail``."""


class LeakTracker:
    """Registered as a plugin by an active run."""

    def __init__(self, bindspace: Path, mode: str, json_path: str | None) -> None:
        self.sockets_dir = bindspace / "tractor"
        self.mode = mode
        self.json_path = json_path
        self.me = os.getpid()
        self.subreaper = _subreaper()
        self.spare = frozenset(p for p in (self.me, _daemon_pid()) if p)
        self.leftovers: list[Leftover] = []
        # Processes started by live fixtures wider than a test, by fixture.
        self.owned: dict[int, dict[int, float]] = {}
        self.before: dict[int, float] = {}
        self.sockets_before: set[str] = set()

    # -- what is there ------------------------------------------------------

    def processes(self) -> dict[int, float]:
        found = procs.subtree(self.me)
        if self.subreaper is not None:
            found.update(procs.subtree(self.subreaper, skip=self.spare))
        for pid in self.spare:
            found.pop(pid, None)
        return found

    def sockets(self) -> set[str]:
        try:
            entries = os.scandir(self.sockets_dir)
        except OSError:
            return set()
        with entries:
            return {e.path for e in entries if stat.S_ISSOCK(e.stat(follow_symlinks=False).st_mode)}

    # -- hooks ----------------------------------------------------------------

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef: pytest.FixtureDef[Any]) -> Generator[None, Any, Any]:
        if fixturedef.scope == "function":
            return (yield)
        before = self.processes()
        try:
            return (yield)
        finally:
            if started := {p: s for p, s in self.processes().items() if before.get(p) != s}:
                self.owned.setdefault(id(fixturedef), {}).update(started)

    def pytest_fixture_post_finalizer(self, fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> None:
        if (started := self.owned.pop(id(fixturedef), None)) is not None:
            alive = {p: s for p, s in started.items() if procs.is_alive(p, s)}
            where = f"{request.node.nodeid}::{fixturedef.argname} ({fixturedef.scope}-scoped fixture)"
            self._settle(where, alive, set())

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, None, None]:
        self.before = self.processes()
        self.sockets_before = self.sockets()
        os.environ[envelope.SCOPE_ENV] = item.nodeid
        return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Generator[None, None, None]:
        try:
            result = yield
        except BaseException:
            self._test_done(item)
            raise
        leftover = self._test_done(item)
        if leftover and self.mode == "fail":
            raise LeakError(
                f"tractor-session: {item.nodeid} left {len(leftover)} thing(s) behind"
                " (--tractor-session-leaks=fail):\n" + "\n".join(leftover.lines())
            )
        return result

    def _test_done(self, item: pytest.Item) -> Leftover | None:
        os.environ.pop(envelope.SCOPE_ENV, None)
        owned = {p for started in self.owned.values() for p in started}
        new = {p: s for p, s in self.processes().items() if self.before.get(p) != s and p not in owned}
        return self._settle(item.nodeid, new, self.sockets() - self.sockets_before)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """xdist workers hand their leftovers to the controller."""
        workeroutput = getattr(session.config, "workeroutput", None)
        if workeroutput is not None:
            workeroutput[WORKER_KEY] = [asdict(leftover) for leftover in self.leftovers]

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object) -> None:
        for data in getattr(node, "workeroutput", {}).get(WORKER_KEY, []):
            self.leftovers.append(Leftover(**data))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.json_path is not None:
            Path(self.json_path).write_text(json.dumps([asdict(x) for x in self.leftovers], indent=2) + "\n")
        if not self.leftovers:
            return
        terminalreporter.section("tractor-session: leftovers by test")
        for leftover in sorted(self.leftovers, key=len, reverse=True):
            terminalreporter.write_line(f"{leftover.nodeid}: {len(leftover)} leftover(s)")
            for line in leftover.lines():
                terminalreporter.write_line(line)

    # -- ending them ------------------------------------------------------------

    def _settle(self, nodeid: str, new: dict[int, float], sockets: set[str]) -> Leftover | None:
        """Record (and unless reporting only, end) what ``nodeid`` left:
        its processes first, then the socket files nobody listens on any
        more, theirs included."""
        leftover = Leftover(nodeid)
        victims = [v for pid, start in new.items() if (v := _victim(pid, start)) is not None]
        if self.mode == "report":
            leftover.processes = [{"pid": v.pid, "cmdline": v.cmdline, "ended_by": None} for v in victims]
        elif victims:
            ended = procs.terminate(victims, GRACE)
            leftover.processes = [{"pid": r.pid, "cmdline": r.cmdline, "ended_by": r.signal} for r in ended]
            for victim in victims:
                _collect_if_child(victim.pid)
        leftover.sockets = sorted(path for path in sockets if not socket_listened_on(Path(path)))
        if self.mode != "report":
            for path in leftover.sockets:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        if not leftover:
            return None
        self.leftovers.append(leftover)
        return leftover


def _victim(pid: int, start: float) -> procs.Victim | None:
    """``pid`` as a victim, if it is still the process first seen."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if procs.start_time(pid) != start:
            return None
        return procs.Victim(pid, start, " ".join(proc.cmdline()) or proc.name())
    except (psutil.Error, OSError):
        return None


def _collect_if_child(pid: int) -> None:
    """Wait for an ended process that is pytest's own child (an orphan
    re-parented here, or a Popen a test forgot): it would stay a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _subreaper() -> int | None:
    """The ``lease`` process this pytest runs under, where the session's
    orphans land, if it still runs."""
    try:
        pid = int(os.environ.get(envelope.SUBREAPER_ENV, ""))
    except ValueError:
        return None
    return pid if pid > 1 and pid == os.getppid() else None


def _daemon_pid() -> int | None:
    """The daemon, which a client restarted from inside the session may
    have left below our subreaper: never a leftover."""
    from tractor_session import paths

    try:
        lock = os.path.join(os.path.dirname(paths.control_socket()), paths.DAEMON_LOCK_NAME)
        with open(lock) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def tracker(config: pytest.Config, bindspace: Path) -> LeakTracker:
    mode = getattr(config.known_args_namespace, "tractor_session_leaks", None) or "reap"
    if mode not in MODES:
        raise pytest.UsageError(f"tractor-session: --tractor-session-leaks={mode}: expected one of {', '.join(MODES)}")
    json_path = getattr(config.known_args_namespace, "tractor_session_leaks_json", None)
    return LeakTracker(bindspace, mode, json_path)
