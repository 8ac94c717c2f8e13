"""Removing a lease's directory (issue 18: items 5, 6 and 13).

- A bindspace holding a 1,200-level tree is removed when its lease ends,
  and its port goes back to the pool (a recursive remover died on it).
- A directory that cannot be removed keeps its lease whole: listed, its
  record on disk, its port taken; the next gc ends it once it can.
- Removing 20k files does not stall the daemon: ``status`` is answered
  while it runs.
- A runtime root swapped for a symlink mid-run leads the daemon nowhere:
  it works through the directory it opened at start-up, and grants no
  lease whose envelope would point elsewhere.

Only outcomes are asserted (paths, ports, what ``status`` lists).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    IS_ROOT,
    QUICK_REAP,
    Runtime,
    export_lease,
    live_leases,
    port_bindable,
    private_pool,
    read_record,
    wait_for,
)

from tractor_session.records import RECORD_NAME

DEPTH = 1200
MANY_FILES = 20_000


def deep_tree(top: Path, depth: int = DEPTH) -> None:
    """``top/d/d/.../d/file``, ``depth`` levels down (built through fds:
    the path passes PATH_MAX)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            below = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
        os.close(os.open("file", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
    finally:
        os.close(fd)


def many_files(top: Path, count: int = MANY_FILES) -> list[str]:
    """``count`` empty files in ``top``; returns the first names a directory
    listing yields (the order a remover meets them in)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(count):
            os.close(os.open(f"f{i}", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
    finally:
        os.close(fd)
    with os.scandir(top) as entries:
        return [entry.name for _, entry in zip(range(100), entries, strict=False)]


def pin(path: Path) -> Callable[[], None]:
    """Make the file ``path`` impossible to remove for us; returns the undo.
    As root, the immutable flag; otherwise a directory without write access."""
    if not IS_ROOT:
        path.parent.chmod(0o500)
        return lambda: path.parent.chmod(0o700)
    if shutil.which("chattr") is None:
        pytest.skip("needs chattr to make a file unremovable for root")
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"the immutable flag is not supported here: {done.stderr.strip()}")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def one_port_daemon(runtime: Runtime, *args: str) -> int:
    """A daemon whose pool holds a single port: a lease gets it only if
    the last one to hold it gave it back.  Returns the port."""
    pool = private_pool(1)
    runtime.start_daemon("--port-pool", str(pool), *QUICK_REAP, *args)
    return pool.low


# -- item 5: a deep tree; a removal that fails ------------------------------------


def test_a_deep_tree_goes_with_its_lease_and_the_port_comes_back(runtime: Runtime) -> None:
    port = one_port_daemon(runtime)
    holder = runtime.holder()
    lease = export_lease(runtime, holder.pid)
    assert lease["port"] == port
    bindspace = Path(lease["bindspace"])
    deep_tree(bindspace / "tractor")

    done = runtime.cli("release", lease["lease_id"])

    assert done.returncode == 0, done.stderr
    assert not os.path.lexists(bindspace)
    assert lease["lease_id"] not in live_leases(runtime)
    assert export_lease(runtime, holder.pid)["port"] == port, "the port went back to the pool"


def test_a_failed_removal_keeps_the_lease_its_record_and_its_port(runtime: Runtime) -> None:
    port = one_port_daemon(runtime, "--gc-interval", "3600")
    holder = runtime.holder()
    lease = export_lease(runtime, holder.pid)
    bindspace = Path(lease["bindspace"])
    pinned = bindspace / "tractor" / "pinned"
    pinned.write_text("cannot be removed")
    unpin = pin(pinned)
    try:
        done = runtime.cli("release", lease["lease_id"])
        assert done.returncode != 0, "the release cannot have removed the directory"
        assert lease["lease_id"] in live_leases(runtime), "the lease is still there"
        assert read_record(bindspace) is not None, "its record is still there"
        taken = runtime.cli("lease", "--json", "--holder-pid", str(holder.pid))
        assert taken.returncode != 0, f"its port was handed out again: {taken.stdout}"
    finally:
        unpin()

    swept = runtime.cli("gc")  # retries the end of the lease
    assert swept.returncode == 0, swept.stderr
    wait_for(lambda: not os.path.lexists(bindspace), what="the retried removal")
    wait_for(lambda: lease["lease_id"] not in live_leases(runtime), what="the lease to end")
    assert export_lease(runtime, holder.pid)["port"] == port


def test_a_child_lease_that_cannot_end_does_not_stop_its_siblings(runtime: Runtime) -> None:
    """A parent's children end side by side: one whose directory cannot be
    removed stays whole (lease, record, port) and is retried, while its
    sibling ends and gives its port back."""
    pool = private_pool(3)
    runtime.start_daemon("--port-pool", str(pool), *QUICK_REAP, "--gc-interval", "3600")
    holder = runtime.holder()
    parent = export_lease(runtime, holder.pid)
    stuck, sibling = (export_lease(runtime, holder.pid, "--parent", parent["lease_id"]) for _ in range(2))
    pinned = Path(stuck["bindspace"]) / "tractor" / "pinned"
    pinned.write_text("cannot be removed")
    unpin = pin(pinned)
    try:
        runtime.cli("release", parent["lease_id"])
        wait_for(lambda: not os.path.lexists(sibling["bindspace"]), what="the sibling to end")
        assert port_bindable(sibling["port"], "127.0.0.1", (socket.SOCK_STREAM,))
        assert stuck["lease_id"] in live_leases(runtime) and read_record(Path(stuck["bindspace"])) is not None
    finally:
        unpin()
    swept = runtime.cli("gc")  # retries the stuck child's end
    assert swept.returncode == 0, swept.stderr
    wait_for(lambda: live_leases(runtime) == {}, what="every lease to end")
    assert not os.path.lexists(stuck["bindspace"])


# -- item 6: removal off the event loop --------------------------------------------


def test_status_is_answered_while_a_large_bindspace_is_removed(runtime: Runtime) -> None:
    runtime.start_daemon(*QUICK_REAP)
    holder = runtime.holder()
    lease = export_lease(runtime, holder.pid, "--tpt-proto", "uds")
    bindspace = Path(lease["bindspace"])
    first = [bindspace / "tractor" / name for name in many_files(bindspace / "tractor")]
    errors: list[BaseException] = []

    def release() -> None:
        try:
            with runtime.connect() as conn:
                conn.release(lease["lease_id"])
        except BaseException as err:  # reported by the test thread
            errors.append(err)

    releasing = threading.Thread(target=release)
    releasing.start()
    try:
        wait_for(lambda: not all(map(os.path.lexists, first)), what="the removal to start")
        with runtime.connect() as conn:
            conn.status()
        assert os.path.lexists(bindspace), "status was answered only once the removal had finished"
    finally:
        releasing.join(timeout=60)
    assert not errors, errors
    assert not os.path.lexists(bindspace)


# -- item 13: the root's fd, not its path --------------------------------------------


def stale_named(where: Path, name: str | None = None) -> Path:
    """A record-less directory named like a bindspace, long stale, holding a file."""
    path = where / (name or uuid.uuid4().hex[:12])
    (path / "tractor").mkdir(parents=True, mode=0o700)
    (path / "tractor" / "keep").write_text("someone's file")
    t = time.time() - 10**6
    os.utime(path, (t, t))
    return path


def test_a_root_swapped_for_a_symlink_leads_the_daemon_nowhere(runtime: Runtime) -> None:
    runtime.start_daemon(*QUICK_REAP, "--gc-interval", "3600")
    holder = runtime.holder()
    lease = export_lease(runtime, holder.pid, "--tpt-proto", "uds")
    name = Path(lease["bindspace"]).name
    garbage = stale_named(runtime.root)
    elsewhere = runtime.base / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    # What the path will lead to: garbage by every rule, and a directory
    # named like the live lease's.
    theirs = [stale_named(elsewhere), stale_named(elsewhere, name)]
    moved = runtime.base / "moved"
    os.rename(runtime.root, moved)
    os.symlink(elsewhere, runtime.root)

    def untouched() -> None:
        assert sorted(elsewhere.iterdir()) == sorted(theirs), "nothing made or removed elsewhere"
        for path in theirs:
            assert (path / "tractor" / "keep").read_text() == "someone's file"

    swept = runtime.cli("gc", "--grace", "0")
    assert swept.returncode == 0, swept.stderr
    untouched()
    assert not os.path.lexists(moved / garbage.name), "gc still cleans the root it opened"

    refused = runtime.cli("lease", "--json", "--holder-pid", str(holder.pid))
    assert refused.returncode != 0, f"a lease was granted under a moved root: {refused.stdout}"
    assert "was replaced by a symlink" in refused.stderr, refused.stderr
    untouched()

    released = runtime.cli("release", lease["lease_id"])
    assert released.returncode == 0, released.stderr
    assert not os.path.lexists(moved / name), "the lease's own directory went with it"
    untouched()


def test_a_bindspace_swapped_for_a_symlink_leads_the_daemon_nowhere(runtime: Runtime) -> None:
    """The daemon reaches a bindspace through the root's fd, never through a
    link in its place: a renewal (which rewrites the record) and the lease's
    end leave the link's target alone."""
    runtime.start_daemon(*QUICK_REAP)
    holder = runtime.holder()
    lease = export_lease(runtime, holder.pid, "--tpt-proto", "uds", "--ttl", "600")
    bindspace = Path(lease["bindspace"])
    victim = stale_named(runtime.base / "victim")
    (victim / RECORD_NAME).write_text("someone's record")
    before = sorted(victim.rglob("*"))
    os.rename(bindspace, runtime.base / "aside")
    os.symlink(victim, bindspace)

    runtime.cli("renew", lease["lease_id"], "--ttl", "900")  # fails: its directory is gone
    released = runtime.cli("release", lease["lease_id"])

    assert released.returncode == 0, released.stderr
    assert not os.path.lexists(bindspace), "the link is removed as itself"
    assert sorted(victim.rglob("*")) == before
    assert (victim / RECORD_NAME).read_text() == "someone's record"
    assert (victim / "tractor" / "keep").read_text() == "someone's file"
