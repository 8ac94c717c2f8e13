"""Leases granted: what a leased command sees (the envelope, its ids, its
bindspace, its registry address on either transport), that concurrent and
nested leases stay apart, and the grant-time rules: holders that are
refused, the port pool (busy ports, ephemeral range, exhaustion) and the
AF_UNIX path budget of a bindspace.

Real daemon processes, real ``python -m tractor_session`` CLI processes,
real unix sockets and real directories under a temporary runtime root;
nothing of ours is mocked.  Leased commands that must stay alive while a
test inspects them block on their stdin (a pipe the test holds) and tell
the test what they see by writing a JSON file; the test closes the pipe to
let them finish.  Every wait is a deadline-bounded ``wait_for``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from conftest import (
    CLI,
    DEADLINE,
    NOBODY,
    UDS_REGISTRY_NAME,
    PortPool,
    Runtime,
    assert_served,
    client_error,
    daemon_processes,
    dead_pid,
    export_lease,
    hold,
    live_leases,
    needs_root,
    pid_alive,
    port_bindable,
    private_pool,
    status_json,
    wait_for,
)

from tractor_session import paths
from tractor_session.daemon import ports
from tractor_session.envelope import load_rtvars

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and pidfds")

UUID4_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def tcp_binds(port: int) -> bool:
    """Whether a TCP socket binds 127.0.0.1:port right now."""
    return port_bindable(port, "127.0.0.1", (socket.SOCK_STREAM,))


# -- the envelope a leased command sees ------------------------------------------


def test_leased_command_sees_tcp_envelope_and_session_is_removed_after(runtime: Runtime, daemon, pool: PortPool) -> None:
    held = hold(runtime, bind=True)
    rt = held.rtvars
    env = held.env

    assert UUID4_RE.fullmatch(rt._session_uuid), rt._session_uuid
    assert env["TRACTOR_SESSION_ID"] == rt._session_uuid
    bindspace = held.bindspace
    assert bindspace.parent == runtime.root
    assert bindspace.name == rt._session_uuid.replace("-", "")[:4]
    assert rt._enable_tpts == ["tcp"]
    low, high = pool
    assert len(rt._registry_addrs) == 1
    host, port = rt._registry_addrs[0]
    assert isinstance(rt._registry_addrs[0], tuple)
    assert host == "127.0.0.1" and low <= port <= high
    assert held.bound == ["127.0.0.1", port]  # the command could listen there
    assert env["XDG_RUNTIME_DIR"] == str(bindspace)

    # While it runs: the bindspace and tractor's subdirectory, owner-only.
    assert bindspace.is_dir() and not bindspace.is_symlink()
    assert mode(bindspace) == 0o700
    assert (bindspace / "tractor").is_dir()
    assert mode(bindspace / "tractor") == 0o700
    assert not tcp_binds(port)  # held by the command's listener

    assert held.finish() == 0
    # Release is synchronous: by the time the CLI has exited it is all gone.
    assert not bindspace.exists()
    assert tcp_binds(port)
    assert status_json(runtime) == []


def test_leased_command_sees_uds_envelope(runtime: Runtime, daemon) -> None:
    held = hold(runtime, "--tpt-proto", "uds", bind=True)
    rt = held.rtvars
    bindspace = held.bindspace

    assert bindspace.parent == runtime.root
    assert rt._enable_tpts == ["uds"]
    assert rt._registry_addrs == [(str(bindspace / "tractor"), UDS_REGISTRY_NAME)]
    assert isinstance(rt._registry_addrs[0], tuple)
    assert held.env["XDG_RUNTIME_DIR"] == str(bindspace)
    assert mode(bindspace) == 0o700 and mode(bindspace / "tractor") == 0o700
    # The command bound the registry socket where tractor would.
    registry = bindspace / "tractor" / UDS_REGISTRY_NAME
    assert stat.S_ISSOCK(os.lstat(registry).st_mode)

    assert held.finish() == 0
    assert not bindspace.exists()
    assert status_json(runtime) == []


def test_no_xdg_leaves_xdg_runtime_dir_alone(runtime: Runtime, daemon) -> None:
    sentinel = str(runtime.base / "my-own-xdg")
    env = {**runtime.env, "XDG_RUNTIME_DIR": sentinel}
    held = hold(runtime, "--no-xdg", env=env)
    assert held.env["XDG_RUNTIME_DIR"] == sentinel
    assert held.bindspace.is_dir()  # still a full session otherwise
    assert held.env["TRACTOR_SESSION_ID"] == held.rtvars._session_uuid
    assert held.finish() == 0
    assert not held.bindspace.exists()

    env.pop("XDG_RUNTIME_DIR")
    held = hold(runtime, "--no-xdg", env=env)
    assert "XDG_RUNTIME_DIR" not in held.env
    assert held.finish() == 0


# -- leases side by side and nested ---------------------------------------------


def test_two_concurrent_leases_get_distinct_ids_bindspaces_and_ports(runtime: Runtime, daemon) -> None:
    first = hold(runtime, bind=True)
    second = hold(runtime, bind=True)

    assert first.rtvars._session_uuid != second.rtvars._session_uuid
    assert first.bindspace != second.bindspace
    assert first.port != second.port
    assert first.bindspace.is_dir() and second.bindspace.is_dir()
    live = {info["lease_id"] for info in status_json(runtime)}
    assert live == {first.rtvars._session_uuid, second.rtvars._session_uuid}

    # Ending one leaves the other intact.
    assert first.finish() == 0
    assert not first.bindspace.exists()
    assert second.bindspace.is_dir()
    assert second.finish() == 0
    assert not second.bindspace.exists()


NESTED = r"""
import json, os, subprocess, sys
out = sys.argv[1]
cli = [sys.executable, "-m", "tractor_session"]
def run(*args):
    res = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=60)
    return {"rc": res.returncode, "out": res.stdout, "err": res.stderr}
report = {
    "env": dict(os.environ),
    "status": run("status", "--json"),
    "status_text": run("status"),
    "export": run("lease", "--json", "--holder-pid", str(os.getpid())),
    "inner": run("lease", "--", sys.executable, "-c",
                 "import json, os; print(json.dumps(dict(os.environ)))"),
}
with open(out + ".tmp", "w") as f:
    json.dump(report, f)
os.replace(out + ".tmp", out)
sys.stdin.read()
"""


def test_nested_cli_reaches_the_same_daemon_and_root(runtime: Runtime, daemon) -> None:
    out = runtime.base / "nested.json"
    cli = runtime.popen([*CLI, "lease", "--", sys.executable, "-c", NESTED, str(out)], stdin=subprocess.PIPE)
    wait_for(lambda: out.exists() or cli.poll() is not None, what="the nested calls")
    assert out.exists(), f"lease exited {cli.returncode}"
    report = json.loads(out.read_text())
    outer_rt = load_rtvars(report["env"])
    outer_id = outer_rt._session_uuid
    outer = Path(outer_rt._bindspace)
    assert report["env"]["XDG_RUNTIME_DIR"] == str(outer)  # the trap being tested

    assert report["status"]["rc"] == 0, report["status"]["err"]
    nested_status = json.loads(report["status"]["out"])
    assert report["status_text"]["out"].startswith(f"daemon pid {daemon.pid}, root {runtime.root}:")
    assert outer_id in {i["lease_id"] for i in nested_status}

    assert report["export"]["rc"] == 0, report["export"]["err"]
    exported = json.loads(report["export"]["out"])
    exported_bs = Path(exported["bindspace"])
    assert exported_bs.parent == runtime.root
    assert exported_bs.is_dir()  # its holder (the outer command) still runs

    assert report["inner"]["rc"] == 0, report["inner"]["err"]
    inner_env = json.loads(report["inner"]["out"])
    inner_rt = load_rtvars(inner_env)
    assert inner_rt._session_uuid not in (outer_id, exported["lease_id"])
    assert Path(inner_rt._bindspace).parent == runtime.root
    assert inner_env["XDG_RUNTIME_DIR"] == inner_rt._bindspace

    # One daemon, and nothing of ours grew inside the outer bindspace.
    assert [p.pid for p in daemon_processes(runtime)] == [daemon.pid]
    assert sorted(p.name for p in outer.iterdir() if not p.name.startswith(".")) == ["tractor"]
    assert list((outer / "tractor").iterdir()) == []

    assert cli.stdin is not None
    cli.stdin.close()
    assert cli.wait(timeout=DEADLINE) == 0
    assert not outer.exists()
    # The exported lease's holder was the outer command: gone with it.
    wait_for(lambda: not exported_bs.exists(), what="the nested lease to end with its holder")
    assert status_json(runtime) == []


# -- holders refused at grant time -------------------------------------------------


@pytest.mark.parametrize(
    "which",
    ["nonexistent", "zombie", "init", "zero", "negative",
     pytest.param("other-user", marks=needs_root("a process of another user"))],
)
def test_refused_holder(runtime: Runtime, which: str) -> None:
    runtime.start_daemon("--reap-grace", "0.5")
    if which == "nonexistent":
        pid, words = dead_pid()[0], "does not exist"
    elif which == "zombie":   # exited, not yet waited for: dead all the same
        zombie = runtime.popen([sys.executable, "-c", "pass"])
        wait_for(lambda: psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE, what="a zombie")
        pid, words = zombie.pid, "does not exist"
    elif which == "init":
        pid, words = 1, "not allowed"
    elif which == "zero":
        pid, words = 0, "not allowed"
    elif which == "negative":
        pid, words = -5, "not allowed"
    else:
        pid, words = runtime.popen(
            ["sleep", "1000"], user=NOBODY, cwd="/",
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ).pid, f"uid {NOBODY}"
    # --json and plain --export: the same refusal, the same one line.
    for how in ("--json", "--export"):
        r = runtime.cli("lease", how, "--holder-pid", str(pid))
        assert r.returncode != 0
        assert r.stdout == ""
        message = r.stderr.strip()
        assert len(message.splitlines()) == 1 and "Traceback" not in message, message
        assert f"holder pid {pid}" in message and words in message, message
        assert runtime.bindspaces() == []
        assert live_leases(runtime) == {}


# -- the port pool -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "kind", "host"),
    [
        (socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1"),
        (socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0"),
        (socket.AF_INET6, socket.SOCK_STREAM, "::1"),
        (socket.AF_INET6, socket.SOCK_DGRAM, "::"),
    ],
    ids=["tcp4", "udp4", "tcp6", "udp6"],
)
def test_a_port_busy_on_tcp_in_any_family_is_not_handed_out(runtime: Runtime, family: int, kind: int, host: str) -> None:
    """A port bound on TCP, over either family, is skipped.  One bound on
    UDP only is handed out: tractor's registry is TCP only, and checking
    UDP let anyone empty the pool with UDP sockets."""
    low = private_pool(2).low
    if not (ports.is_free(low) and ports.is_free(low + 1)):
        pytest.skip("the private pool is in use")
    busy = socket.socket(family, kind)
    try:
        try:
            if family == socket.AF_INET6:
                busy.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            busy.bind((host, low))
        except OSError as err:
            pytest.skip(f"cannot bind {host}: {err}")
        runtime.start_daemon("--port-pool", f"{low}-{low + 1}")
        holder = runtime.holder()
        assert export_lease(runtime, holder.pid)["port"] == (low + 1 if kind == socket.SOCK_STREAM else low)
    finally:
        busy.close()


def test_serve_refuses_a_port_pool_inside_the_ephemeral_range(runtime: Runtime) -> None:
    eph = ports.ephemeral_range()
    spec = f"{eph.start + 10}-{eph.start + 20}"
    res = runtime.cli("serve", "--root", str(runtime.root), "--port-pool", spec, timeout=DEADLINE)
    assert res.returncode != 0
    assert spec in res.stderr and "ephemeral" in res.stderr, res.stderr
    assert daemon_processes(runtime) == []


def test_exhausted_port_pool_is_a_clear_refusal_and_nothing_breaks(runtime: Runtime, tmp_path: Path) -> None:
    """A full pool is a refusal that says so, to the library and to the
    CLI: not a crash of the daemon that holds everyone's leases, not a
    dropped connection (which would also end the leases the asker already
    holds), and nothing half-made.  A uds lease needs no port and is still
    granted; a port given back is handed out again."""
    low, high = private_pool(2)
    log = tmp_path / "daemon.log"
    daemon = runtime.start_daemon("--port-pool", f"{low}-{high}", log=log)
    holder = runtime.holder()
    with runtime.connect() as greedy:
        first, second = (greedy.lease("tcp").lease for _ in range(2))
        assert {first.port, second.port} == {low, high}
        err = client_error(lambda: greedy.lease("tcp"))
        assert daemon.poll() is None, f"the daemon died: {log.read_text()[-2000:]}"
        assert err.code == "no-free-port", err
        assert f"no free port in {low}-{high}" in str(err), err
        assert "2 leases hold ports" in str(err), err
        assert len(runtime.bindspaces()) == 2, "the failed grant left a bindspace behind"
        # Same connection, still usable, its leases still live.
        assert sorted(i.lease_id for i in greedy.status().leases) == sorted([first.lease_id, second.lease_id])
        assert Path(first.bindspace).is_dir() and Path(second.bindspace).is_dir()
        # A uds lease needs no port: still granted, on this connection and to
        # another client.
        uds = greedy.lease("uds")
        greedy.release(uds.lease.lease_id)
        assert_served(runtime, "uds")

        # The CLI says so too, and its refused lease leaves nothing.
        res = runtime.cli("lease", "--export", "--holder-pid", str(holder.pid))
        assert res.returncode != 0
        assert "no free port" in res.stderr, res.stderr
        assert pid_alive(daemon.pid), "the daemon died"
        assert sorted(i["lease_id"] for i in status_json(runtime)) == sorted([first.lease_id, second.lease_id])
        assert len(runtime.bindspaces()) == 2

        # A port given back is the next one handed out.
        greedy.release(first.lease_id)
        assert assert_served(runtime, "tcp").lease.port == first.port
    # The asking connection closed: its connection-bound lease ends.
    wait_for(lambda: not Path(second.bindspace).exists(), what="the connection-bound lease to end")
    assert live_leases(runtime) == {}


# -- the path budget -------------------------------------------------------------------


def deepest_socket_len(root: Path) -> int:
    """Length of the deepest socket path tractor may create in a bindspace
    of ``root``: <root>/<4 hex>/tractor/actor.<32 hex>@<7 digits>.sock."""
    bindspace = root / ("0" * 4)
    return len(os.fsencode(bindspace / "tractor" / f"actor.{'0' * 32}@{'9' * 7}.sock"))


@pytest.mark.parametrize("deepest", [paths.AF_UNIX_PATH_MAX - 1, paths.AF_UNIX_PATH_MAX])
def test_bindspace_socket_paths_must_fit_af_unix(runtime: Runtime, pool: PortPool, deepest: int) -> None:
    filler = deepest - deepest_socket_len(runtime.base / "r")
    if filler < 0:
        pytest.skip("the temp dir is too deep for this boundary")
    root = runtime.base / ("r" * (1 + filler))
    assert deepest_socket_len(root) == deepest
    env = {**runtime.env, paths.ROOT_ENV: str(root)}
    if deepest < paths.AF_UNIX_PATH_MAX:  # fits, NUL included: granted, and really bindable
        runtime.start_daemon("--port-pool", str(pool), root=root)
        res = runtime.cli("lease", "--json", "--holder-pid", str(runtime.holder().pid), env=env)
        assert res.returncode == 0, res.stderr
        tractor_dir = Path(json.loads(res.stdout)["bindspace"]) / "tractor"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(str(tractor_dir / f"actor.{'a' * 32}@1234567.sock"))
        return
    # One byte too many: no daemon serves such a root, and a client about to
    # start one says why, with the budget, the length and the fix.
    budget = (f"{len(os.fsencode(root))} bytes long", f"at most {paths.ROOT_BUDGET} bytes", paths.ROOT_ENV)
    served = runtime.cli("serve", "--root", str(root), "--port-pool", str(pool))
    assert served.returncode == 1 and all(s in served.stderr for s in budget), served.stderr
    res = runtime.cli("lease", "--", "true", env=env)
    assert res.returncode != 0 and all(s in res.stderr for s in budget), res.stderr
    assert "Traceback" not in res.stderr
    assert not root.exists() or list(root.iterdir()) == []  # no lease left behind
    res = runtime.cli("status", "--json", env=env)
    assert (res.returncode, json.loads(res.stdout)) == (0, [])  # and no daemon started


def test_a_control_socket_path_too_long_is_named_with_the_budget(runtime: Runtime) -> None:
    long_socket = runtime.base / ("s" * paths.AF_UNIX_PATH_MAX) / "control.sock"
    env = {**runtime.env, paths.SOCKET_ENV: str(long_socket)}
    for argv in (["lease", "--", "true"], ["status", "x0"]):
        res = runtime.cli(*argv, env=env)
        assert res.returncode == 1, res
        assert f"at most {paths.AF_UNIX_PATH_MAX - 1}" in res.stderr and str(long_socket) in res.stderr, res.stderr
    served = runtime.cli("serve", "--socket", str(long_socket))
    assert served.returncode == 1 and f"at most {paths.AF_UNIX_PATH_MAX - 1}" in served.stderr, served.stderr
    assert runtime.bindspaces() == []
