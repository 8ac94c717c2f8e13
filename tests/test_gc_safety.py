"""Garbage collection is safe (issue 4): it removes stale bindspaces, dead
sockets in the shared default bindspace and leftover processes of dead
sessions, and never a live lease (not while a lease is being granted, not
while no daemon runs), nothing outside the root, nothing not ours.

Every case is built for real in the test's private runtime root (real dead
pids, real listening and non-listening unix sockets, real symlinks, real
processes) and checked in three ways (the ``mode`` parameter):

- ``direct``: ``tractor-session gc`` with no daemon running (it then trusts
  the on-disk lease records and holder liveness);
- ``daemon``: ``tractor-session gc`` through a running daemon;
- ``sweep``: no command at all, a daemon's periodic sweep.

Only outcomes are asserted (a path exists or not, a process lives or not),
never log lines.  A sweep is waited for with a *barrier*: a stale canary
directory is dropped into the root and waited out, twice, so that one whole
sweep (process scan, directory scan, reaping, removal) is known to have
started after everything the test built.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
from conftest import (
    DEADLINE,
    IS_ROOT,
    NOBODY,
    QUICK_REAP,
    SLEEP,
    Runtime,
    dead_pid,
    export_lease,
    lease_env,
    live_leases,
    pid_alive,
    start_lease_cmd,
    stop,
    wait_for,
)

from tractor_session import client, gc, paths, procs
from tractor_session.envelope import RuntimeVars, dump_rtvars, load_rtvars
from tractor_session.records import RECORD_NAME, LeaseRecord, write_record
from tractor_session.rootdir import RootDir

MODES = ("direct", "daemon", "sweep")
STALE = 10**6  # seconds: older than any grace used in these tests

# -- building blocks -------------------------------------------------------------


def _default_sigint() -> None:
    # A test runner started in the background may ignore SIGINT, and
    # children inherit that; reaping starts with SIGINT, so restore it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def sleeper(rt: Runtime, env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen[bytes]:
    """A live process (killed at teardown)."""
    return rt.popen(["sleep", "300"], env=env, preexec_fn=_default_sigint, **kw)


def ensure_root(rt: Runtime) -> Path:
    rt.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(rt.root, 0o700)
    return rt.root


def stage(rt: Runtime) -> Path:
    """A directory beside the root (same filesystem) where items are built
    whole before being renamed into the root, so that a sweep never sees
    one half made."""
    path = rt.base / "stage"
    path.mkdir(exist_ok=True)
    return path


def age(path: Path, seconds: float) -> Path:
    t = time.time() - seconds
    os.utime(path, (t, t), follow_symlinks=False)
    return path


def new_name() -> str:
    """A name for a bindspace, as a daemon of this version gives one."""
    return paths.bindspace_name(str(uuid.uuid4()))


def stale_dir(rt: Runtime, name: str | None = None, seconds: float = STALE) -> Path:
    """A record-less directory named like a bindspace, ``seconds`` old."""
    staged = stage(rt) / (name or new_name())
    staged.mkdir(mode=0o700)
    path = ensure_root(rt) / staged.name
    os.rename(staged, path)
    return age(path, seconds)


def dead_socket(rt: Runtime, where: Path, name: str) -> Path:
    """A socket file nobody listens on (bound, then closed)."""
    staged = stage(rt) / name
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(os.fspath(staged))
    path = where / name
    os.rename(staged, path)
    return path


@pytest.fixture
def listen(runtime: Runtime):
    """listen(where, name): a socket file someone listens on, until teardown."""
    socks: list[socket.socket] = []

    def make(where: Path, name: str) -> Path:
        staged = stage(runtime) / name
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        socks.append(sock)
        sock.bind(os.fspath(staged))
        sock.listen(128)
        path = where / name
        os.rename(staged, path)  # the listener follows the inode
        return path

    yield make
    for sock in socks:
        sock.close()


def recorded(
    rt: Runtime, holder_pid: int, holder_start: float | None, expires: float | None = None,
    *, lease_id: str | None = None, legacy: bool = False,
) -> tuple[Path, str]:
    """A bindspace with a lease record, as a daemon leaves it on disk: named
    as this version names it or, with ``legacy``, as earlier ones did.
    Built in place: until its record is written, a fresh directory is
    spared by the (default) grace, as a lease being granted is."""
    lease_id = lease_id or str(uuid.uuid4())
    bindspace = rt.root / paths.bindspace_names(lease_id)[1 if legacy else 0]
    bindspace.mkdir(mode=0o700)
    (bindspace / "tractor").mkdir(mode=0o700)
    fd = os.open(bindspace, os.O_RDONLY | os.O_DIRECTORY)
    try:
        write_record(LeaseRecord(
            lease_id=lease_id, bindspace=str(bindspace), transport="uds", port=None, env={},
            created=time.time(), holder_pid=holder_pid, holder_start=holder_start, expires=expires,
        ), fd)
    finally:
        os.close(fd)
    return bindspace, lease_id


def envelope_env(rt: Runtime, bindspace: str) -> tuple[str, dict[str, str]]:
    """A fresh session id and an environment carrying its envelope, with
    ``bindspace`` as the session's directory."""
    sid = str(uuid.uuid4())
    name, value = dump_rtvars(RuntimeVars(_session_uuid=sid, _bindspace=bindspace))
    return sid, {**rt.env, name: value}


def dead_session_env(rt: Runtime) -> dict[str, str]:
    """An envelope naming a session of this root that no lease holds."""
    sid = str(uuid.uuid4())
    name, value = dump_rtvars(
        RuntimeVars(_session_uuid=sid, _bindspace=str(rt.root / paths.bindspace_name(sid)))
    )
    return {**rt.env, name: value}


def parse_exports(text: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in text.splitlines():
        word, assignment = shlex.split(line)
        assert word == "export", line
        key, value = assignment.split("=", 1)
        env[key] = value
    return env


def start_quiet_daemon(rt: Runtime) -> subprocess.Popen[bytes]:
    """A daemon that sweeps only at start-up; returns once that sweep has
    reached its removal step, so it cannot race what the test builds next."""
    canary = stale_dir(rt)
    daemon = rt.start_daemon("--gc-interval", "3600", "--reap-grace", "1")
    wait_for(lambda: not os.path.lexists(canary), what="the daemon's start-up sweep")
    return daemon


class Gc:
    """One way of collecting garbage (see the module docstring)."""

    def __init__(self, rt: Runtime, mode: str, grace: float | None = None) -> None:
        self.rt = rt
        self.mode = mode
        self.grace = grace
        self.daemon: subprocess.Popen[bytes] | None = None
        ensure_root(rt)
        if mode == "daemon":
            self.daemon = start_quiet_daemon(rt)
        elif mode == "sweep":
            args = ["--gc-interval", "0.05", "--reap-grace", "1"]
            if grace is not None:
                args += ["--gc-grace", str(grace)]
            self.daemon = rt.start_daemon(*args)

    def lease(self, holder_pid: int) -> tuple[dict[str, str], Path]:
        """A live lease held by ``holder_pid``: its exported environment and
        bindspace.  In direct mode a daemon runs just long enough to grant
        leases (they stay on disk when it stops); take leases first, then
        build garbage."""
        if self.daemon is None:
            self.daemon = start_quiet_daemon(self.rt)
        result = self.rt.cli("lease", "--export", "--holder-pid", str(holder_pid))
        assert result.returncode == 0, result.stderr
        env = parse_exports(result.stdout)
        bindspace = load_rtvars(env)._bindspace
        assert bindspace is not None
        path = Path(bindspace)
        assert path.parent == self.rt.root and path.is_dir()
        return env, path

    def run(self, *extra: str) -> str:
        """Collect once (CLI) or wait out one whole sweep; the CLI's stdout."""
        if self.mode == "sweep":
            assert self.daemon is not None
            self._barrier()
            self._barrier()
            return ""
        if self.mode == "direct" and self.daemon is not None:
            stop(self.daemon)
            self.daemon = None
        args = ["gc", *extra]
        if self.grace is not None:
            args += ["--grace", str(self.grace)]
        result = self.rt.cli(*args)
        assert result.returncode == 0, result.stderr
        if "--json" not in extra:
            how = "directly (no daemon runs)" if self.mode == "direct" else "through the daemon"
            assert how in result.stdout.splitlines()[-1], result.stdout
        return result.stdout

    def _barrier(self) -> None:
        daemon = self.daemon
        assert daemon is not None
        canary = stale_dir(self.rt)

        def swept() -> bool:
            if daemon.poll() is not None:
                assert daemon.stderr is not None
                raise AssertionError(f"the daemon died: {daemon.stderr.read().decode()[-2000:]}")
            return not os.path.lexists(canary)

        wait_for(swept, what="a daemon sweep")


def text_items(out: str, verb: str) -> list[tuple[str, str]]:
    """(kind, path) of each item line of gc's text output; checks the total."""
    *lines, total = out.strip().splitlines()
    assert re.fullmatch(rf"{len(lines)} item\(s\) {verb}, .+", total), total
    items = []
    for line in lines:
        assert line.startswith(verb + " "), line
        kind, rest = line[len(verb) + 1 :].split(" ", 1)
        # A process's "path" is "pid N: cmdline"; its reason starts "session".
        path = rest.rsplit(": session ", 1)[0] if kind == "process" else rest.split(": ", 1)[0]
        items.append((kind, path))
    return items


def json_items(out: str) -> list[tuple[str, str]]:
    data = json.loads(out)
    assert isinstance(data, list)
    for item in data:
        assert set(item) == {"kind", "path", "reason"} and item["reason"]
    return [(item["kind"], item["path"]) for item in data]


# -- 1. bindspaces ---------------------------------------------------------------


@pytest.mark.parametrize("grace", [None, 0], ids=["default-grace", "grace0"])
@pytest.mark.parametrize("mode", MODES)
def test_recordless_bindspace_age_rule(runtime: Runtime, mode: str, grace: float | None) -> None:
    gc = Gc(runtime, mode, grace)
    ancient = stale_dir(runtime, seconds=1000)
    young = stale_dir(runtime, seconds=100)
    fresh = stale_dir(runtime, seconds=0)
    # An unreadable record counts as none.
    staged = stage(runtime) / new_name()
    staged.mkdir(mode=0o700)
    (staged / RECORD_NAME).write_bytes(b"{not json")
    broken = runtime.root / staged.name
    os.rename(staged, broken)

    gc.run()

    assert not ancient.exists(), "older than the default grace: garbage either way"
    for path in (young, fresh, broken):
        if grace is None:
            assert path.is_dir(), f"{path.name} is younger than the default grace (300 s)"
        else:
            assert not path.exists(), f"{path.name} is older than a grace of 0"


@pytest.mark.parametrize("legacy", [False, True], ids=["named-now", "named-by-earlier-versions"])
@pytest.mark.parametrize("mode", MODES)
def test_bindspace_of_dead_holder_or_expired_lease_is_removed(runtime: Runtime, mode: str, legacy: bool) -> None:
    """A record naming a dead holder (or past its expiry) makes a bindspace
    garbage at once, whatever its age: checked with the default grace and
    fresh directories, so only the record can condemn them.  The session's
    leftover process goes with it.  Bindspaces named by earlier versions (12
    hex digits) are collected alike."""
    gc = Gc(runtime, mode)  # default grace: 300 s
    holder, holder_start = dead_pid()
    live_holder = sleeper(runtime)
    dead, dead_id = recorded(runtime, holder, holder_start, legacy=legacy)
    expired, _ = recorded(
        runtime, live_holder.pid, psutil.Process(live_holder.pid).create_time(), expires=time.time() - 1,
        legacy=legacy,
    )
    name, value = dump_rtvars(RuntimeVars(_session_uuid=dead_id, _bindspace=str(dead)))
    leftover = sleeper(runtime, env={**runtime.env, name: value})

    gc.run()

    assert not dead.exists(), "its recorded holder is dead"
    assert not expired.exists(), "its lease expired"
    wait_for(lambda: not pid_alive(leftover.pid), what="the dead session's process to be reaped")


@pytest.mark.parametrize("mode", MODES)
def test_a_reused_bindspace_name_neither_spares_a_dead_session_nor_condemns_a_live_one(
    runtime: Runtime, mode: str,
) -> None:
    """Bindspace names are 4 hex digits, and come back once their session
    is gone.  A process left by an old session whose name now belongs to a
    live lease is still reaped, and the live lease stays."""
    gc = Gc(runtime, mode)
    holder = sleeper(runtime)
    live, live_id = recorded(runtime, holder.pid, procs.start_time(holder.pid))
    old_id = live_id[:4] + str(uuid.uuid4())[4:]
    assert old_id != live_id and paths.bindspace_name(old_id) == live.name
    name, value = dump_rtvars(RuntimeVars(_session_uuid=old_id, _bindspace=str(live)))
    leftover = sleeper(runtime, env={**runtime.env, name: value})

    gc.run()

    wait_for(lambda: not pid_alive(leftover.pid), what="the old session's process to be reaped")
    assert (live / RECORD_NAME).is_file() and pid_alive(holder.pid)


def test_gc_removes_only_the_directory_it_judged(runtime: Runtime) -> None:
    """Names come back: between gc's scan and its removal (a reap grace
    apart, in a daemon's sweep), a dead session's directory may go and its
    name go to a new session, whose directory gc must then leave alone."""
    ensure_root(runtime)
    holder, holder_start = dead_pid()
    old, old_id = recorded(runtime, holder, holder_start)
    with RootDir.open(runtime.root) as root:
        findings = gc.scan(root, grace=300)
        assert [item.path for item in findings.bindspaces] == [str(old)]
        shutil.rmtree(old)  # its lease ended meanwhile...
        live = sleeper(runtime)  # ... and a new one got the name
        new, _ = recorded(runtime, live.pid, procs.start_time(live.pid), lease_id=old_id[:4] + str(uuid.uuid4())[4:])
        assert new == old
        assert gc.remove(root, findings) == []
    assert (new / RECORD_NAME).is_file()


@pytest.mark.parametrize("mode", MODES)
def test_live_lease_is_kept_with_its_sockets_and_processes(runtime: Runtime, mode: str, listen) -> None:
    """A live lease survives gc with grace 0 even when its bindspace is old
    (a long test run): the directory, the sockets in it (listened on or
    not) and the processes carrying its envelope."""
    gc = Gc(runtime, mode, grace=0)
    holder = sleeper(runtime)
    env, bindspace = gc.lease(holder.pid)
    pid, _ = dead_pid()
    inner = bindspace / "tractor"
    dead_inside = dead_socket(runtime, inner, f"actor@{pid}.sock")
    listened_inside = listen(inner, "registry@1616.sock")
    dead_top = dead_socket(runtime, bindspace, f"sub@{pid}.sock")
    member = sleeper(runtime, env={**runtime.env, **env})
    age(bindspace, STALE)
    # Garbage beside it, to show the collection really ran.
    garbage = dead_socket(runtime, runtime.root, f"actor@{pid}.sock")

    gc.run()

    assert not os.path.lexists(garbage)
    assert bindspace.is_dir()
    assert (bindspace / RECORD_NAME).is_file()
    for path in (dead_inside, listened_inside, dead_top):
        assert os.path.lexists(path), f"{path.name} is in a live bindspace"
    assert pid_alive(member.pid), "a live session's process must not be reaped"
    assert pid_alive(holder.pid)


def test_restarted_daemon_start_up_sweep_keeps_live_leases(runtime: Runtime) -> None:
    ensure_root(runtime)
    first = start_quiet_daemon(runtime)
    holder = sleeper(runtime)
    result = runtime.cli("lease", "--export", "--holder-pid", str(holder.pid))
    assert result.returncode == 0, result.stderr
    env = parse_exports(result.stdout)
    bindspace = Path(load_rtvars(env)._bindspace or "")
    member = sleeper(runtime, env={**runtime.env, **env})
    stop(first)  # live leases stay on disk for the next daemon

    canary = stale_dir(runtime)
    runtime.start_daemon("--gc-interval", "3600", "--gc-grace", "0", "--reap-grace", "1")
    wait_for(lambda: not os.path.lexists(canary), what="the start-up sweep")

    assert bindspace.is_dir()
    assert pid_alive(member.pid)


def test_gc_while_no_daemon_runs_spares_live_sessions(runtime: Runtime) -> None:
    """Between a clean stop and the next daemon, the leases live on disk
    only: `gc` (which then works directly) must not take them for garbage."""
    daemon = runtime.start_daemon(*QUICK_REAP)
    holder = runtime.holder()
    lease = export_lease(runtime, holder.pid)
    bindspace = Path(lease["bindspace"])
    inside = runtime.popen([sys.executable, "-c", SLEEP], env=lease_env(runtime, lease),
                           start_new_session=True, stdin=subprocess.DEVNULL)
    wait_for(lambda: "_TRACTOR_RT_VARS" in psutil.Process(inside.pid).environ(),
             what="the session's process to run with its envelope")
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=DEADLINE) == 0

    r = runtime.cli("gc", "--grace", "0")
    assert r.returncode == 0, r.stderr
    assert bindspace.is_dir(), f"gc removed a live session: {r.stdout}"
    assert pid_alive(inside.pid), "gc reaped a live session's process"

    runtime.start_daemon(*QUICK_REAP)
    assert lease["lease_id"] in live_leases(runtime)


# -- 2. sockets in the shared default bindspace ------------------------------------


def test_gc_while_no_daemon_runs_ends_a_lease_cmd_whose_lease_process_died(runtime: Runtime) -> None:
    """What ends ``lease -- CMD`` with a daemon ends it without one: its
    ``lease`` process SIGKILLed, gc removes the session and reaps CMD,
    though CMD, the lease's recorded holder, still runs."""
    daemon = runtime.start_daemon()
    cli, cmd, bindspace, _ = start_lease_cmd(runtime, cmd=["sleep", "300"])
    try:
        daemon.kill()
        daemon.wait()
        cli.kill()
        cli.wait()
        assert pid_alive(cmd.pid)

        result = runtime.cli("gc")
        assert result.returncode == 0, result.stderr
        assert not bindspace.exists()
        wait_for(lambda: not pid_alive(cmd.pid), what="the command of the dead lease process to be reaped")
    finally:
        with contextlib.suppress(psutil.Error):
            cmd.kill()   # re-parented away from the CLI: no teardown finds it


@pytest.mark.parametrize("mode", MODES)
def test_sockets_in_the_root(runtime: Runtime, mode: str, listen) -> None:
    gc = Gc(runtime, mode, grace=0)
    root = runtime.root
    pid1, _ = dead_pid()
    pid2, _ = dead_pid()
    dead_actor = dead_socket(runtime, root, f"actor@{pid1}.sock")
    dead_registry = dead_socket(runtime, root, "registry@1616.sock")
    # Its binder lives, but nobody listens: garbage too.
    unheard = dead_socket(runtime, root, f"tool@{os.getpid()}.sock")
    # Its name says dead, but someone listens: never removed.
    heard = listen(root, f"actor@{pid2}.sock")
    heard_registry = listen(root, "registry@1617.sock")
    not_a_socket = root / f"notes@{pid1}.sock"
    not_a_socket.write_text("a regular file")

    gc.run()

    for path in (dead_actor, dead_registry, unheard):
        assert not os.path.lexists(path), f"nobody listens on {path.name}"
    for path in (heard, heard_registry):
        assert os.path.lexists(path), f"{path.name} is listened on"
    assert not_a_socket.is_file()
    # The listeners still work.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(os.fspath(heard))


# -- 3. leftover processes -----------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_processes_of_dead_sessions_are_reaped(runtime: Runtime, mode: str) -> None:
    gc = Gc(runtime, mode, grace=0)
    orphan = sleeper(runtime, env=dead_session_env(runtime))
    # Sessions of other roots are another daemon's business, including a
    # root whose path merely starts with ours.
    other_root = runtime.base / "other" / "tractor"
    _, foreign_env = envelope_env(runtime, str(other_root / new_name()))
    foreign = sleeper(runtime, env=foreign_env)
    _, prefix_env = envelope_env(runtime, f"{runtime.root}x/{new_name()}")
    prefixed = sleeper(runtime, env=prefix_env)
    # ... and one whose path is shorter than our root's.
    _, shallow_env = envelope_env(runtime, str(runtime.base / new_name()))
    shallow = sleeper(runtime, env=shallow_env)
    # An envelope that does not parse names no session.
    garbled = sleeper(runtime, env={**runtime.env, "_TRACTOR_RT_VARS": "{'_session_uuid': oops"})
    survivors = [foreign, prefixed, shallow, garbled]
    if IS_ROOT:
        # Another user's process, even one carrying a dead session of ours.
        survivors.append(sleeper(runtime, env=dead_session_env(runtime), user=NOBODY, group=NOBODY))

    gc.run()

    wait_for(lambda: not pid_alive(orphan.pid), timeout=5, what="the orphan to be reaped")
    for proc in survivors:
        assert pid_alive(proc.pid), proc.args


# -- 4. safety ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_safety(runtime: Runtime, mode: str) -> None:
    home = runtime.base / "home"
    home.mkdir()
    (home / "sentinel").write_text("keep me")
    runtime.env["HOME"] = str(home)  # what the CLI and the daemon see
    outside = runtime.base / "outside"
    outside.mkdir()
    (outside / "sentinel").write_text("keep me")

    gc = Gc(runtime, mode, grace=0)
    root = runtime.root

    # A symlink named like a bindspace, pointing at the (stand-in) home.
    home_link = root / new_name()
    os.symlink(home, home_link)
    # A stale bindspace full of links leading outside the root.
    staged = stage(runtime) / new_name()
    (staged / "tractor").mkdir(parents=True, mode=0o700)
    os.symlink(outside, staged / "escape")
    os.symlink(outside / "sentinel", staged / "tractor" / "file-link")
    os.symlink(home, staged / "tractor" / "home")
    stale = root / staged.name
    os.rename(staged, stale)
    age(stale, STALE)
    # Not ours by kind or by name: left alone, however old.
    regular = root / new_name()
    regular.write_text("a regular file named like a bindspace")
    age(regular, STALE)
    kept = [regular]
    for name in ("notours", "ABCDEF123456", "0123456789a", "0123456789abc"):
        kept.append(stale_dir(runtime, name))
    if IS_ROOT:
        # Another user's (chowned before they enter the root, where they
        # would be garbage if ours): a directory, a dead socket, a symlink.
        pid, _ = dead_pid()
        theirs = stage(runtime) / new_name()
        theirs.mkdir(mode=0o700)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(os.fspath(stage(runtime) / f"actor@{pid}.sock"))
        os.symlink(home, stage(runtime) / (link_name := new_name()))
        for name in (theirs.name, f"actor@{pid}.sock", link_name):
            os.lchown(stage(runtime) / name, NOBODY, NOBODY)
            os.rename(stage(runtime) / name, root / name)
            kept.append(age(root / name, STALE))

    gc.run()

    assert not os.path.lexists(home_link), "the link itself is garbage"
    assert (home / "sentinel").read_text() == "keep me"
    assert not os.path.lexists(stale)
    assert (outside / "sentinel").read_text() == "keep me"
    assert outside.is_dir() and home.is_dir()
    for path in kept:
        assert os.path.lexists(path), f"{path.name} is not ours to remove"
    assert regular.is_file()

    # Only now that links are known to be removed as links: one pointing at
    # the real home.  Nothing but the home's existence is looked at.
    real_home = Path.home()
    assert real_home.is_dir()
    real_link = root / new_name()
    os.symlink(real_home, real_link)
    gc.run()
    assert not os.path.lexists(real_link)
    assert real_home.is_dir()


@pytest.mark.parametrize("mode", MODES)
def test_a_directory_in_place_of_the_record_does_not_break_gc(runtime: Runtime, mode: str) -> None:
    gc = Gc(runtime, mode, grace=0)
    odd = stage(runtime) / new_name()
    (odd / RECORD_NAME).mkdir(parents=True)
    odd_in_root = runtime.root / odd.name
    os.rename(odd, odd_in_root)
    age(odd_in_root, STALE)
    pid, _ = dead_pid()
    other = dead_socket(runtime, runtime.root, f"actor@{pid}.sock")

    gc.run()

    assert not os.path.lexists(odd_in_root), "an unreadable record counts as none"
    assert not os.path.lexists(other)
    if gc.daemon is not None:
        assert gc.daemon.poll() is None, "the daemon must survive"


@pytest.mark.parametrize("mode", MODES)
def test_a_deep_tree_does_not_break_gc(runtime: Runtime, mode: str) -> None:
    """1,200 nested directories in a stale bindspace (issue 18, item 5): a
    recursive remover died on them and skipped the rest."""
    gc = Gc(runtime, mode, grace=0)
    deep = stage(runtime) / new_name()
    deep.mkdir()
    fd = os.open(deep, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(1200):  # through fds: the path passes PATH_MAX
            os.mkdir("d", dir_fd=fd)
            fd, above = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
            os.close(above)
    finally:
        os.close(fd)
    deep_in_root = runtime.root / deep.name
    os.rename(deep, deep_in_root)
    age(deep_in_root, STALE)
    others = [stale_dir(runtime) for _ in range(3)]

    gc.run()

    for path in (deep_in_root, *others):
        assert not os.path.lexists(path)
    if gc.daemon is not None:
        assert gc.daemon.poll() is None, "the daemon must survive"


@pytest.mark.parametrize("mode", MODES)
def test_an_unreadable_record_costs_one_entry(runtime: Runtime, mode: str) -> None:
    """A bindspace whose record no one can open (a socket in its place;
    chmod 000 would not stop root) is kept, since gc cannot tell whether
    its lease lives, and is no reason to spare anything else, or for a
    daemon not to start over it."""
    odd = stage(runtime) / new_name()
    odd.mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(odd / RECORD_NAME))
    odd_in_root = ensure_root(runtime) / odd.name
    os.rename(odd, odd_in_root)
    age(odd_in_root, STALE)
    stale = stale_dir(runtime)
    gc = Gc(runtime, mode, grace=0)

    gc.run()

    assert not os.path.lexists(stale)
    assert odd_in_root.is_dir()
    if gc.daemon is not None:
        assert gc.daemon.poll() is None, "the daemon must survive"


def test_a_fifo_in_place_of_the_record_does_not_hang_gc(runtime: Runtime) -> None:
    odd = stage(runtime) / new_name()
    odd.mkdir()
    os.mkfifo(odd / RECORD_NAME)
    odd_in_root = ensure_root(runtime) / odd.name
    os.rename(odd, odd_in_root)
    age(odd_in_root, STALE)
    try:
        result = runtime.cli("gc", "--grace", "0", timeout=3)  # killed on timeout
    except subprocess.TimeoutExpired:
        pytest.fail("gc hung opening a FIFO named like the lease record")
    assert result.returncode == 0, result.stderr
    assert not os.path.lexists(odd_in_root)


def test_live_leases_survive_gc_while_granted_concurrently(runtime: Runtime) -> None:
    """Leases are granted while the daemon sweeps with grace 0 every 10 ms
    and gc with grace 0 runs in a loop beside; no granted bindspace ever
    disappears.  TCP leases: probing a port widens the window in which a
    new bindspace exists without its record.  (Removing the daemon's
    live-lease filter in `Daemon.collect` makes this fail nearly always.)"""
    ensure_root(runtime)
    runtime.start_daemon("--gc-interval", "0.01", "--gc-grace", "0", "--reap-grace", "1")
    holder = sleeper(runtime)
    stop_loop = threading.Event()
    loop_runs: list[int] = []
    loop_errors: list[BaseException] = []

    def gc_loop() -> None:
        # Through the client library: many more collections than the CLI's
        # start-up cost would allow.
        try:
            with client.connect(environ=runtime.env, autostart=False) as conn:
                while not stop_loop.is_set():
                    conn.gc(dry_run=False, grace=0)
                    loop_runs.append(1)
        except BaseException as err:  # reported by the test thread
            loop_errors.append(err)

    thread = threading.Thread(target=gc_loop)
    thread.start()
    granted: list[Path] = []
    try:
        for _ in range(6):
            for _ in range(10):
                with client.connect(environ=runtime.env) as conn:
                    reply = conn.lease("tcp", holder_pid=holder.pid)
                granted.append(Path(reply.lease.bindspace))
            result = runtime.cli("gc", "--grace", "0")
            assert result.returncode == 0, result.stderr
            missing = [p.name for p in granted if not p.is_dir()]
            assert not missing, f"live bindspaces collected: {missing}"
    finally:
        stop_loop.set()
        thread.join(timeout=DEADLINE)
    assert not loop_errors, loop_errors
    assert len(loop_runs) >= 6, "the gc loop hardly ran"
    assert all((p / RECORD_NAME).is_file() for p in granted)
    with client.connect(environ=runtime.env, autostart=False) as conn:
        live = {info.bindspace for info in conn.status().leases}
    assert {str(p) for p in granted} <= live


# -- 5. --dry-run and --json -------------------------------------------------------------


def _build_mixed(rt: Runtime, pid: int, listen) -> tuple[list[Path], list[Path], subprocess.Popen[bytes]]:
    """The same garbage every time it is called (same names), plus things
    to keep; returns (garbage paths, kept paths, a dead session's process)."""
    root = rt.root
    outside = rt.base / "outside"
    outside.mkdir(exist_ok=True)
    stale = stale_dir(rt, "a0a0a0a0a0a0")
    link = root / "b0b0b0b0b0b0"
    os.symlink(outside, link)
    sockets = [
        dead_socket(rt, root, f"actor@{pid}.sock"),
        dead_socket(rt, root, "registry@1616.sock"),
    ]
    kept = [stale_dir(rt, "notours"), stale_dir(rt, "c0c0c0c0c0c0", seconds=0)]
    if not (root / f"live@{pid}.sock").exists():
        kept.append(listen(root, f"live@{pid}.sock"))
    else:
        kept.append(root / f"live@{pid}.sock")
    orphan = sleeper(rt, env=dead_session_env(rt))
    return [stale, link, *sockets], kept, orphan


def _normal(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(kind, re.sub(r"^pid \d+: ", "pid N: ", path)) for kind, path in items]


@pytest.mark.parametrize("mode", ["direct", "daemon"])
def test_dry_run_and_json(runtime: Runtime, mode: str, listen) -> None:
    gc = Gc(runtime, mode)
    pid, _ = dead_pid()
    garbage, kept, orphan = _build_mixed(runtime, pid, listen)
    expected = {("process", f"pid {orphan.pid}: sleep 300")} | {
        ("symlink" if p.is_symlink() else "bindspace" if p.is_dir() else "socket", str(p)) for p in garbage
    }
    before = sorted(os.listdir(runtime.root))

    # --grace 60: the fresh record-less c0c0... stays, the old one goes.
    dry_text = text_items(gc.run("--dry-run", "--grace", "60"), "would remove")
    dry_json = json_items(gc.run("--dry-run", "--json", "--grace", "60"))

    assert sorted(os.listdir(runtime.root)) == before, "--dry-run removed something"
    assert pid_alive(orphan.pid), "--dry-run reaped a process"
    assert set(dry_text) == expected
    assert sorted(dry_text) == sorted(dry_json), "--json lists what the text output lists"

    real_json = json_items(gc.run("--json", "--grace", "60"))
    assert sorted(real_json) == sorted(dry_json), "a real run removes what --dry-run listed"
    for path in garbage:
        assert not os.path.lexists(path)
    for path in kept:
        assert os.path.lexists(path)
    wait_for(lambda: not pid_alive(orphan.pid), timeout=5, what="the orphan to be reaped")

    # The same garbage again, collected with text output.
    garbage, kept, orphan2 = _build_mixed(runtime, pid, listen)
    real_text = text_items(gc.run("--grace", "60"), "removed")
    assert sorted(_normal(real_text)) == sorted(_normal(real_json))
    for path in garbage:
        assert not os.path.lexists(path)
    for path in kept:
        assert os.path.lexists(path)
    wait_for(lambda: not pid_alive(orphan2.pid), timeout=5, what="the orphan to be reaped")


def test_gc_without_daemon_refuses_a_symlinked_root(runtime: Runtime) -> None:
    """A root that is a link could lead gc anywhere: refuse it by name and
    touch nothing behind it."""
    target = runtime.base / "elsewhere"
    target.mkdir(mode=0o700)
    victim = target / "abcdefabcdef"
    victim.mkdir()
    os.utime(victim, (0, 0))
    runtime.root.symlink_to(target)
    done = runtime.cli("gc", "--grace", "0")
    assert done.returncode != 0
    assert "symlink" in done.stderr and str(runtime.root) in done.stderr
    assert victim.is_dir(), "gc followed a symlinked root"
