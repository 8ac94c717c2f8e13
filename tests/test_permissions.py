"""Whom the daemon serves and which directories it trusts: a peer of
another uid is refused even when the permissions are loosened by hand, as
is a holder pid of another user; the runtime root and the control
directory must be real, owner-only directories of ours, or the daemon, the
CLI and the client refuse them by name (also when one is swapped under a
running daemon), whatever the umask.

Real daemon processes, real unix sockets, a real other uid (a forked child
that drops to uid 65534, as root) and real unsafe directories (symlinks,
world-writable, chowned); nothing of ours is mocked.  Every wait is a
deadline (``wait_for`` or a socket timeout).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    DEADLINE,
    HELLO,
    IS_ROOT,
    NOBODY,
    Runtime,
    assert_served,
    client_error,
    daemon_processes,
    kill_tree,
    needs_root,
    pid_alive,
    raw_connect,
    read_to_eof,
    split_frames,
    wait_for,
)

from tractor_session import paths
from tractor_session.protocol import Error, LeaseRequest, frame

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and SO_PEERCRED")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def as_nobody() -> dict[str, Any]:
    """Popen keywords that run the child as uid/gid 65534, no extra groups."""
    return {"user": NOBODY, "group": NOBODY, "extra_groups": [], "cwd": "/"}



# -- peer credentials -----------------------------------------------------------------

def run_as_other_uid(fn: Callable[[], dict[str, Any]], timeout: float = DEADLINE) -> dict[str, Any]:
    """Run ``fn`` in a forked child that switched to uid/gid 65534 (no
    supplementary groups) and return what it returns (JSON-able).

    A fork rather than a new interpreter: this venv's python may live
    where uid 65534 cannot read it."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = json.dumps(fn()).encode()
            while out:
                out = out[os.write(write_fd, out):]
            code = 0
        except BaseException as err:  # noqa: BLE001 - report anything
            with contextlib.suppress(BaseException):
                os.write(write_fd, json.dumps({"error": repr(err)}).encode())
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        data = b""
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError("the other-uid child did not finish in time")
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            data += chunk
        result = json.loads(data or b"{}")
        assert "error" not in result, result["error"]
        return result
    finally:
        os.close(read_fd)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@needs_root("switching uid")
def test_peer_of_another_uid_is_refused_even_with_loosened_permissions(runtime: Runtime, tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    runtime.start_daemon(log=log)
    # Loosen by hand what is owner-only by design: traverse the dirs, write
    # the socket.  The uid check must hold on its own.
    os.chmod(runtime.base, 0o711)
    os.chmod(runtime.control, 0o711)
    os.chmod(runtime.socket, 0o666)
    before = os.listdir(runtime.root)

    payload = HELLO + frame(LeaseRequest("uds")) + frame(LeaseRequest("tcp", holder_pid=os.getpid()))

    def other_uid_client() -> dict[str, Any]:
        with raw_connect(runtime.socket, timeout=10) as sock:
            with contextlib.suppress(OSError):
                sock.sendall(payload)
            return {"uid": os.getuid(), "data": read_to_eof(sock).hex()}

    out = run_as_other_uid(other_uid_client)
    assert out["uid"] == NOBODY
    replies = split_frames(bytes.fromhex(out["data"]))
    # Refused with a clear error (or simply hung up on), never served.
    assert len(replies) <= 1, replies
    if replies:
        (reply,) = replies
        assert isinstance(reply, Error) and reply.code == "forbidden", reply
    assert os.listdir(runtime.root) == before, "a refused peer must not get a bindspace"

    wait_for(lambda: re.search(rf"refus\w*.*\buid {NOBODY}\b", log.read_text()),
             what="the daemon's log line about the refused uid")
    assert_served(runtime)


@contextlib.contextmanager
def flood_as_other_uid(path: Path) -> Iterator[None]:
    """A forked child, as uid 65534, connecting to ``path`` and hanging up
    as fast as it can until the end of the block."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            while True:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, contextlib.suppress(OSError):
                    sock.connect(str(path))
        finally:
            os._exit(0)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@needs_root("switching uid")
def test_a_flood_from_another_uid_neither_fails_requests_nor_floods_the_log(runtime: Runtime, tmp_path: Path) -> None:
    """Another user's flood of connections (with the permissions loosened)
    fills the daemon's queue: our clients wait for room instead of failing
    (EAGAIN), and the refusals are logged at a bounded rate, not one line
    each."""
    log = tmp_path / "daemon.log"
    runtime.start_daemon(log=log)
    os.chmod(runtime.base, 0o711)
    os.chmod(runtime.control, 0o711)
    os.chmod(runtime.socket, 0o666)
    with flood_as_other_uid(runtime.socket):
        wait_for(lambda: re.search(rf"refus\w*.*\buid {NOBODY}\b", log.read_text()), what="the flood to begin")
        size = log.stat().st_size
        for _ in range(100):
            with runtime.connect() as conn:
                conn.status()
        assert_served(runtime)
        grown = log.stat().st_size - size
    assert grown < 2000, f"the log grew by {grown} bytes during the flood"


@needs_root("a process of another user")
def test_holder_pid_of_another_user_is_refused(runtime: Runtime, tmp_path: Path) -> None:
    runtime.start_daemon(log=tmp_path / "daemon.log")
    # cat blocks on its stdin; any program uid 65534 may run will do.
    stranger = runtime.holder(["cat"], **as_nobody())
    assert pid_alive(stranger.pid)
    with runtime.connect() as conn:
        err = client_error(lambda: conn.lease("uds", holder_pid=stranger.pid))
        assert err.code == "bad-holder", err
        assert str(stranger.pid) in str(err) and str(NOBODY) in str(err), err
        assert runtime.bindspaces() == []
        # Nor can an existing lease be moved onto the stranger.
        granted = conn.lease("uds")
        err = client_error(lambda: conn.bind(granted.lease.lease_id, stranger.pid))
        assert err.code == "bad-holder", err
        # Our own pid is fine, and the lease still works after the refusal.
        conn.bind(granted.lease.lease_id, os.getpid())
        conn.release(granted.lease.lease_id)
    assert runtime.bindspaces() == []
    assert_served(runtime)


# -- unsafe directories -----------------------------------------------------------------

UNSAFE = {
    "symlink": "symlink",
    "world-writable": "writable by others",
    "foreign-owned": "owned by uid 65534",
}


def make_unsafe(path: Path, kind: str) -> None:
    """Turn ``path`` (absent, or a dir of ours) into an unsafe directory."""
    if kind == "symlink":
        target = path.with_name(path.name + ".target")
        target.mkdir(mode=0o700)
        if path.exists():
            path.rename(target / "unused")
        path.symlink_to(target)
        return
    path.mkdir(mode=0o700, exist_ok=True)
    if kind == "world-writable":
        path.chmod(0o777)
    else:
        os.chown(path, 65534, -1)


def unsafe_params() -> list[Any]:
    return [pytest.param(k, marks=needs_root("chown to another uid") if k == "foreign-owned" else ()) for k in UNSAFE]


@pytest.mark.parametrize("kind", unsafe_params())
def test_ensure_private_dir_refuses_unsafe_dirs(runtime: Runtime, kind: str) -> None:
    path = runtime.base / "dir"
    make_unsafe(path, kind)
    with pytest.raises(paths.UnsafePathError) as info:
        paths.ensure_private_dir(path)
    assert str(path) in str(info.value)
    assert UNSAFE[kind] in str(info.value)


def test_ensure_private_dir_creates_0700_whatever_the_umask(runtime: Runtime) -> None:
    path = runtime.base / "fresh"
    old = os.umask(0)
    try:
        paths.ensure_private_dir(path)
    finally:
        os.umask(old)
    assert mode(path) == 0o700
    paths.ensure_private_dir(path)  # and accepts it afterwards


@pytest.mark.parametrize("which", ["root", "control"])
@pytest.mark.parametrize("kind", unsafe_params())
def test_serve_refuses_an_unsafe_directory(runtime: Runtime, kind: str, which: str) -> None:
    path = runtime.root if which == "root" else runtime.control
    make_unsafe(path, kind)
    res = runtime.cli("serve", "--root", str(runtime.root), timeout=DEADLINE)
    assert res.returncode != 0
    assert str(path) in res.stderr and UNSAFE[kind] in res.stderr, res.stderr
    assert daemon_processes(runtime) == []


@pytest.mark.parametrize("which", ["root", "control"])
@pytest.mark.parametrize("kind", unsafe_params())
def test_lease_refuses_an_unsafe_directory_naming_it(runtime: Runtime, kind: str, which: str) -> None:
    path = runtime.root if which == "root" else runtime.control
    make_unsafe(path, kind)
    res = runtime.cli("lease", "--", "true")
    assert res.returncode != 0
    assert str(path) in res.stderr and UNSAFE[kind] in res.stderr, res.stderr
    assert daemon_processes(runtime) == []


@pytest.mark.parametrize("kind", unsafe_params())
def test_client_refuses_a_control_dir_made_unsafe_under_a_running_daemon(runtime: Runtime, daemon, kind: str) -> None:
    control = runtime.control
    if kind == "symlink":
        # Someone swaps the directory for a link to one that looks the same.
        moved = runtime.base / "elsewhere"
        control.rename(moved)
        control.symlink_to(moved)
    else:
        make_unsafe(control, kind)
    for args in (("status",), ("lease", "--", "true")):
        res = runtime.cli(*args)
        assert res.returncode != 0, f"{args}: used {control} ({kind})"
        assert str(control) in res.stderr and UNSAFE[kind] in res.stderr, res.stderr


@pytest.mark.skipif(Path(f"/run/user/{os.getuid()}").is_dir(), reason="the fallback is only used without /run/user/<uid>")
def test_fallback_runtime_dir_that_is_world_writable_is_refused(runtime: Runtime) -> None:
    # No override, no XDG_RUNTIME_DIR: the client falls back to
    # <tmp>/runtime-<uid>, here pre-created world-writable by "someone".
    fallback = runtime.base / f"runtime-{os.getuid()}"
    fallback.mkdir()
    fallback.chmod(0o777)
    env = {k: v for k, v in runtime.env.items() if k not in (paths.ROOT_ENV, "XDG_RUNTIME_DIR")}
    env["TMPDIR"] = str(runtime.base)
    control = Path(paths.control_dir(fallback / "tractor"))
    try:
        res = runtime.cli("lease", "--", "true", env=env)
        assert res.returncode != 0
        assert str(fallback) in res.stderr and "writable by others" in res.stderr, res.stderr
    finally:
        try:
            pid = int((control / "daemon.lock").read_text())
        except (OSError, ValueError):
            pass
        else:
            kill_tree(pid)




# -- XDG_RUNTIME_DIR: used only when it is what the spec promises -------------------------


@pytest.mark.parametrize("case", ["relative", "missing", "a file", "another user's"])
def test_a_bad_xdg_runtime_dir_is_refused_with_the_fix(runtime: Runtime, case: str) -> None:
    if case == "another user's" and not IS_ROOT:
        pytest.skip("making a directory another user's needs root")
    xdg = runtime.base / "xdg"
    if case == "relative":
        value = "relative/xdg"
    elif case == "missing":
        value = str(xdg)
    elif case == "a file":
        xdg.write_text("")
        value = str(xdg)
    else:
        xdg.mkdir(mode=0o700)
        os.chown(xdg, NOBODY, NOBODY)
        value = str(xdg)
    env = {k: v for k, v in runtime.env.items() if k != paths.ROOT_ENV} | {"XDG_RUNTIME_DIR": value}
    before = sorted(p.name for p in runtime.base.iterdir())
    for argv in (["lease", "--", "true"], ["status"]):
        res = runtime.cli(*argv, env=env, cwd=runtime.base)
        assert res.returncode == 1, res
        assert f"XDG_RUNTIME_DIR={value!r}" in res.stderr or f"XDG_RUNTIME_DIR={value} " in res.stderr, res.stderr
        assert "unset it" in res.stderr and "Traceback" not in res.stderr
    # Nothing created: not the runtime dir, not ours under it, no daemon.
    assert sorted(p.name for p in runtime.base.iterdir()) == before
    assert not (runtime.base / "relative").exists() and not (xdg / "tractor").exists()
