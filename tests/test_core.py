"""Integration tests for the core product (issue 2): a real daemon process,
real ``python -m tractor_session`` CLI processes, real unix sockets, real
directories under a temporary runtime root and real signals.

Nothing of ours is mocked.  Leased commands that must stay alive while a
test inspects them block on their stdin (a pipe the test holds) and tell
the test what they see by writing a JSON file; the test closes the pipe to
let them finish.  Every wait is a deadline-bounded ``wait_for``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest
from conftest import DEADLINE, Runtime, kill_tree, pid_alive, wait_for

from tractor_session import paths, protocol
from tractor_session.daemon import ports
from tractor_session.client import ClientError, connect
from tractor_session.envelope import load_rtvars
from tractor_session.protocol import (
    Error,
    Hello,
    StatusRequest,
    Welcome,
    decode_reply,
    frame,
)
from tractor_session.wire import HEADER, PROTOCOL_VERSION

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and pidfds")

CLI = [sys.executable, "-m", "tractor_session"]
UDS_REGISTRY_NAME = "registry@1616.sock"
UUID4_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")

# A leased command that reports what it sees and then blocks until the test
# closes its stdin.  argv: OUT_JSON [bind]; with "bind" it also binds the
# session's registry address, as a tractor registrar would.
HOLD = r"""
import json, os, socket, sys
out = sys.argv[1]
info = {"pid": os.getpid(), "env": dict(os.environ), "bound": None}
if len(sys.argv) > 2 and sys.argv[2] == "bind":
    from tractor_session.envelope import load_rtvars
    rt = load_rtvars(os.environ)
    host, port = rt._registry_addrs[0]
    if rt._enable_tpts == ["uds"]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(os.path.join(host, port))
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((host, port))
    sock.listen()
    info["bound"] = [host, port]
with open(out + ".tmp", "w") as f:
    json.dump(info, f)
os.replace(out + ".tmp", out)
sys.stdin.read()
"""

# Installs handlers for INT, TERM and HUP that record the signal and exit
# 40+N; argv: OUT READY.
ON_SIGNAL = r"""
import os, signal, sys
out, ready = sys.argv[1], sys.argv[2]
def handler(signum, frame):
    with open(out, "a") as f:
        f.write(f"{signum}\n")
    os._exit(40 + signum)
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, handler)
open(ready, "w").close()
while True:
    signal.pause()
"""

# Blocks on stdin: a holder process for `lease --export --holder-pid`.
BLOCK = "import sys; sys.stdin.read()"


# -- helpers ----------------------------------------------------------------


def private_pool(size: int = 200) -> str:
    """A random port window outside the kernel's ephemeral range and away
    from the default pool (which every other daemon on this host starts
    handing out at its first port), so that concurrent test runs do not
    collide on the ports we bind-check."""
    eph = ports.ephemeral_range()
    rng = random.SystemRandom()
    for _ in range(100):
        low = rng.randrange(10000, 20000 - size)
        window = range(low, low + size)
        outside = window.stop <= eph.start or window.start >= eph.stop
        if outside and ports.is_free(window.start):
            return f"{window.start}-{window.stop - 1}"
    pytest.skip(f"no room for a private port pool outside the ephemeral range {eph}")


def tcp_binds(port: int) -> bool:
    """Whether a TCP socket binds 127.0.0.1:port right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def status_json(runtime: Runtime, env: dict[str, str] | None = None) -> dict[str, Any]:
    res = runtime.cli("status", "--json", env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def daemon_processes(runtime: Runtime) -> list[psutil.Process]:
    """Every live ``tractor_session serve`` process for this runtime root."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if (
            "tractor_session" in cmdline
            and "serve" in cmdline
            and str(runtime.root) in cmdline
            and pid_alive(proc.pid)
        ):
            found.append(proc)
    return found


def signal_caught(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``sig``."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@dataclasses.dataclass
class Held:
    """A ``tractor-session lease -- CMD`` whose CMD is alive and blocked."""

    cli: subprocess.Popen[bytes]
    pid: int  # the leased command's
    env: dict[str, str]
    bound: list[Any] | None

    @property
    def rtvars(self):  # noqa: ANN201
        return load_rtvars(self.env)

    @property
    def bindspace(self) -> Path:
        return Path(self.rtvars._bindspace)

    @property
    def port(self) -> int:
        host, port = self.rtvars._registry_addrs[0]
        assert isinstance(port, int)
        return port

    def finish(self) -> int:
        """Let the command end; return the CLI's exit status."""
        assert self.cli.stdin is not None
        self.cli.stdin.close()
        return self.cli.wait(timeout=DEADLINE)


def sigkill(held: Held) -> None:
    """SIGKILL the CLI and its command at once (what an OOM killer or a
    `kill -9` of the process group does) and wait until both are gone."""
    for pid in (held.cli.pid, held.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    held.cli.wait(timeout=DEADLINE)
    # The command is re-parented once the CLI dies; it may stay a zombie.
    wait_for(lambda: not pid_alive(held.pid), what=f"pid {held.pid} to die")


def kill_if_alive(*pids: int) -> None:
    """SIGKILL processes that are not our children (no waiting on them)."""
    for pid in pids:
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def stop_autostarted_daemon(runtime: Runtime) -> None:
    """SIGKILL a daemon a client started (not our child, so conftest's
    kill_tree would sit waiting on its zombie)."""
    if (pid := runtime.daemon_pid()) is not None:
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid), what="the daemon to die")


def hold(runtime: Runtime, *lease_args: str, bind: bool = False, env: dict[str, str] | None = None) -> Held:
    """Start ``lease [ARGS] -- <HOLD>`` and return once its command runs."""
    out = runtime.base / f"held-{uuid.uuid4().hex}.json"
    argv = [*CLI, "lease", *lease_args, "--", sys.executable, "-c", HOLD, str(out)]
    if bind:
        argv.append("bind")
    cli = runtime.popen(argv, env=env, stdin=subprocess.PIPE)
    wait_for(lambda: out.exists() or cli.poll() is not None, what="the leased command to start")
    if not out.exists():
        raise AssertionError(f"lease exited with {cli.returncode} before its command reported")
    info = json.loads(out.read_text())
    return Held(cli, info["pid"], info["env"], info["bound"])


def holder_process(runtime: Runtime) -> subprocess.Popen[bytes]:
    """A long-lived process to name with --holder-pid (dies at teardown)."""
    return runtime.popen([sys.executable, "-c", BLOCK], stdin=subprocess.PIPE)


def export_lease(runtime: Runtime, holder_pid: int, *args: str) -> dict[str, Any]:
    res = runtime.cli("lease", "--export", "--json", "--holder-pid", str(holder_pid), *args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def start_daemon_at(runtime: Runtime, root: Path, *args: str) -> subprocess.Popen[bytes]:
    """``serve --root ROOT`` (killed at teardown); return once it is ready."""
    read_fd, write_fd = os.pipe()
    proc = runtime.popen(
        [*CLI, "serve", "--root", str(root), "--ready-fd", str(write_fd), *args],
        pass_fds=(write_fd,),
    )
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as ready:
        assert ready.read(6), f"the daemon for {root} did not start"
    return proc


@pytest.fixture
def pool() -> str:
    return private_pool()


@pytest.fixture
def daemon(runtime: Runtime, pool: str) -> subprocess.Popen[bytes]:
    """The conftest daemon, but handing out ports from a private window."""
    return runtime.start_daemon("--port-pool", pool)


# -- 1. the envelope a leased command sees ------------------------------------


def test_leased_command_sees_tcp_envelope_and_session_is_removed_after(runtime: Runtime, daemon, pool: str) -> None:
    held = hold(runtime, bind=True)
    rt = held.rtvars
    env = held.env

    assert UUID4_RE.fullmatch(rt._session_uuid), rt._session_uuid
    assert env["TRACTOR_SESSION_ID"] == rt._session_uuid
    bindspace = held.bindspace
    assert bindspace.parent == runtime.root
    assert bindspace.name == rt._session_uuid.replace("-", "")[:12]
    assert rt._enable_tpts == ["tcp"]
    low, high = map(int, pool.split("-"))
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
    assert status_json(runtime)["leases"] == []


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
    assert status_json(runtime)["leases"] == []


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


# -- 2. concurrent leases -----------------------------------------------------


def test_two_concurrent_leases_get_distinct_ids_bindspaces_and_ports(runtime: Runtime, daemon) -> None:
    first = hold(runtime, bind=True)
    second = hold(runtime, bind=True)

    assert first.rtvars._session_uuid != second.rtvars._session_uuid
    assert first.bindspace != second.bindspace
    assert first.port != second.port
    assert first.bindspace.is_dir() and second.bindspace.is_dir()
    live = {info["lease_id"] for info in status_json(runtime)["leases"]}
    assert live == {first.rtvars._session_uuid, second.rtvars._session_uuid}

    # Ending one leaves the other intact.
    assert first.finish() == 0
    assert not first.bindspace.exists()
    assert second.bindspace.is_dir()
    assert second.finish() == 0
    assert not second.bindspace.exists()


# -- 3. exit codes and signals ------------------------------------------------


def test_exit_status_passes_through(runtime: Runtime, daemon) -> None:
    for script, expected in [
        ("exit 0", 0),
        ("exit 7", 7),
        ("exit 255", 255),
        ("kill -TERM $$", 128 + signal.SIGTERM),
        ("kill -KILL $$", 128 + signal.SIGKILL),
    ]:
        res = runtime.cli("lease", "--", "sh", "-c", script)
        assert res.returncode == expected, (script, res.stderr)
        assert runtime.bindspaces() == [], script


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_signals_to_the_cli_are_passed_on_to_the_command(runtime: Runtime, daemon, sig: signal.Signals) -> None:
    out, ready = runtime.base / "signal", runtime.base / "ready"
    cli = runtime.popen(
        [*CLI, "lease", "--", sys.executable, "-c", ON_SIGNAL, str(out), str(ready)],
        stdin=subprocess.DEVNULL,
    )
    wait_for(lambda: ready.exists() or cli.poll() is not None, what="the command's handlers")
    assert cli.poll() is None
    # The CLI installs its forwarding handlers right after starting CMD;
    # SIGHUP's is the last one.
    wait_for(lambda: signal_caught(cli.pid, signal.SIGHUP), what="the CLI's signal handlers")
    assert len(runtime.bindspaces()) == 1

    cli.send_signal(sig)
    assert cli.wait(timeout=DEADLINE) == 40 + sig  # CMD's own exit status
    assert out.read_text() == f"{int(sig)}\n"  # delivered exactly once
    assert runtime.bindspaces() == []


def test_sigint_is_passed_on_when_the_cli_has_no_stdin(runtime: Runtime, daemon) -> None:
    out, ready = runtime.base / "signal", runtime.base / "ready"
    # `exec 0<&-`: the CLI starts with fd 0 closed (as under some
    # supervisors), so Python sets sys.stdin to None.
    cli = runtime.popen(
        ["sh", "-c", 'exec 0<&-; exec "$@"', "sh",
         *CLI, "lease", "--", sys.executable, "-c", ON_SIGNAL, str(out), str(ready)],
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: ready.exists() or cli.poll() is not None, what="the command's handlers")
    assert cli.poll() is None
    wait_for(lambda: signal_caught(cli.pid, signal.SIGHUP), what="the CLI's signal handlers")
    cli.send_signal(signal.SIGINT)
    code = cli.wait(timeout=DEADLINE)
    assert cli.stderr is not None
    stderr = cli.stderr.read().decode()
    assert "Traceback" not in stderr, stderr
    assert code == 40 + signal.SIGINT, stderr


# -- 4. command not found -----------------------------------------------------


def test_command_not_found_exits_127_and_leaves_no_lease(runtime: Runtime, daemon) -> None:
    missing = f"no-such-command-{uuid.uuid4().hex[:8]}"
    res = runtime.cli("lease", "--", missing, "--some-arg")
    assert res.returncode == 127
    assert missing in res.stderr
    assert "Traceback" not in res.stderr
    assert status_json(runtime)["leases"] == []
    assert runtime.bindspaces() == []


def test_command_not_executable_exits_126_and_leaves_no_lease(runtime: Runtime, daemon) -> None:
    script = runtime.base / "not-executable.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o600)
    res = runtime.cli("lease", "--", str(script))
    assert res.returncode == 126
    assert str(script) in res.stderr
    assert status_json(runtime)["leases"] == []
    assert runtime.bindspaces() == []


# -- 5. release ---------------------------------------------------------------


@pytest.mark.parametrize("by", ["full-id", "prefix"])
def test_release_ends_an_exported_lease(runtime: Runtime, daemon, by: str) -> None:
    holder = holder_process(runtime)
    lease = export_lease(runtime, holder.pid)
    lease_id = lease["lease_id"]
    bindspace = Path(lease["bindspace"])
    assert bindspace.is_dir()
    assert [i["lease_id"] for i in status_json(runtime)["leases"]] == [lease_id]

    name = lease_id if by == "full-id" else lease_id.replace("-", "")[:12]
    res = runtime.cli("release", name)
    assert res.returncode == 0, res.stderr
    assert lease_id in res.stdout
    assert not bindspace.exists()
    assert status_json(runtime)["leases"] == []
    assert pid_alive(holder.pid)  # the holder itself is not the session's to kill

    # Releasing it again: it is unknown now.
    again = runtime.cli("release", name)
    assert again.returncode != 0
    assert "no live lease" in again.stderr and name in again.stderr


def test_release_of_an_unknown_id_fails_clearly(runtime: Runtime, daemon) -> None:
    unknown = str(uuid.uuid4())
    res = runtime.cli("release", unknown)
    assert res.returncode != 0
    assert unknown in res.stderr and "no live lease" in res.stderr
    assert "Traceback" not in res.stderr


def test_release_of_a_malformed_id_fails_clearly(runtime: Runtime, daemon) -> None:
    holder = holder_process(runtime)
    lease = export_lease(runtime, holder.pid)
    for bad in ["../../etc", "0123456789a", "x" * 500, ""]:
        res = runtime.cli("release", bad)
        assert res.returncode != 0, bad
        assert "not a lease id" in res.stderr, (bad, res.stderr)
        assert "Traceback" not in res.stderr
    # Nothing was touched.
    assert Path(lease["bindspace"]).is_dir()
    assert [i["lease_id"] for i in status_json(runtime)["leases"]] == [lease["lease_id"]]


def test_export_lease_with_a_dead_holder_pid_is_refused(runtime: Runtime, daemon) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    res = runtime.cli("lease", "--export", "--holder-pid", str(gone.pid))
    assert res.returncode != 0
    assert str(gone.pid) in res.stderr
    assert runtime.bindspaces() == []


# -- 6. status ----------------------------------------------------------------


def test_status_lists_live_leases(runtime: Runtime, daemon) -> None:
    tcp_holder, uds_holder = holder_process(runtime), holder_process(runtime)
    before = time.time()
    tcp = export_lease(runtime, tcp_holder.pid)
    uds = export_lease(runtime, uds_holder.pid, "--tpt-proto", "uds")
    after = time.time()

    status = status_json(runtime)
    assert status["daemon_pid"] == daemon.pid
    assert status["root"] == str(runtime.root)
    by_id = {info["lease_id"]: info for info in status["leases"]}
    assert set(by_id) == {tcp["lease_id"], uds["lease_id"]}

    info = by_id[tcp["lease_id"]]
    assert info["holder_pid"] == tcp_holder.pid
    assert info["bindspace"] == tcp["bindspace"]
    assert info["transport"] == "tcp"
    assert info["registry_addr"] == ["127.0.0.1", tcp["port"]]
    assert before - 1 <= info["created"] <= after + 1

    info = by_id[uds["lease_id"]]
    assert info["holder_pid"] == uds_holder.pid
    assert info["bindspace"] == uds["bindspace"]
    assert info["transport"] == "uds"
    assert info["registry_addr"] == [str(Path(uds["bindspace"]) / "tractor"), UDS_REGISTRY_NAME]
    assert before - 1 <= info["created"] <= after + 1

    res = runtime.cli("status")
    assert res.returncode == 0, res.stderr
    assert f"daemon pid {daemon.pid}" in res.stdout
    lines = {lease["lease_id"]: line for lease in (tcp, uds) for line in res.stdout.splitlines() if lease["lease_id"] in line}
    assert set(lines) == {tcp["lease_id"], uds["lease_id"]}
    for lease, holder, addr in (
        (tcp, tcp_holder, f"127.0.0.1:{tcp['port']}"),
        (uds, uds_holder, f"{uds['bindspace']}/tractor/{UDS_REGISTRY_NAME}"),
    ):
        line = lines[lease["lease_id"]]
        assert str(holder.pid) in line.split()
        assert lease["bindspace"] in line
        assert addr in line
        assert re.search(r"\s\d+[smh]\s", line), f"no age in {line!r}"


def test_status_without_a_daemon_fails_clearly_and_starts_none(runtime: Runtime) -> None:
    res = runtime.cli("status")
    assert res.returncode != 0
    assert "no tractor-session daemon" in res.stderr
    assert daemon_processes(runtime) == []


# -- 7. cold start ------------------------------------------------------------


def test_fifty_clients_at_once_start_exactly_one_daemon(runtime: Runtime) -> None:
    assert daemon_processes(runtime) == []
    holder = holder_process(runtime)
    clients = [
        runtime.popen(
            [*CLI, "lease", "--export", "--json", "--holder-pid", str(holder.pid)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for _ in range(50)
    ]
    leases = []
    for client in clients:
        out, err = client.communicate(timeout=60)
        assert client.returncode == 0, err.decode()
        leases.append(json.loads(out))

    daemons = daemon_processes(runtime)
    assert len(daemons) == 1, [d.cmdline() for d in daemons]
    assert runtime.daemon_pid() == daemons[0].pid
    assert len({lease["lease_id"] for lease in leases}) == 50
    assert len({lease["bindspace"] for lease in leases}) == 50
    assert len({lease["port"] for lease in leases}) == 50
    assert all(Path(lease["bindspace"]).is_dir() for lease in leases)
    status = status_json(runtime)
    assert status["daemon_pid"] == daemons[0].pid
    assert {i["lease_id"] for i in status["leases"]} == {lease["lease_id"] for lease in leases}

    # The holder's death ends all fifty.
    kill_tree(holder.pid)
    wait_for(lambda: runtime.bindspaces() == [], what="fifty bindspaces to go")
    assert status_json(runtime)["leases"] == []
    stop_autostarted_daemon(runtime)


# -- 8. nested ----------------------------------------------------------------

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
    "export": run("lease", "--json", "--export", "--holder-pid", str(os.getpid())),
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
    assert nested_status["daemon_pid"] == daemon.pid
    assert nested_status["root"] == str(runtime.root)
    assert outer_id in {i["lease_id"] for i in nested_status["leases"]}

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
    assert status_json(runtime)["leases"] == []


# -- 9. dead holders ----------------------------------------------------------


def test_sigkilled_holder_and_command_end_the_lease(runtime: Runtime, daemon) -> None:
    held = hold(runtime)
    assert held.bindspace.is_dir()
    sigkill(held)
    wait_for(lambda: not held.bindspace.exists(), what="the bindspace to go")
    assert tcp_binds(held.port)
    assert status_json(runtime)["leases"] == []


def test_sigkilled_cli_gets_its_orphaned_command_reaped(runtime: Runtime, daemon) -> None:
    held = hold(runtime)
    os.kill(held.cli.pid, signal.SIGKILL)
    held.cli.wait(timeout=DEADLINE)
    # The command (blocked on stdin, which we still hold open) would live on;
    # the daemon ends it (SIGINT) as a leftover of the session.
    wait_for(lambda: not pid_alive(held.pid), what="the orphaned command to be reaped")
    wait_for(lambda: not held.bindspace.exists(), what="the bindspace to go")
    assert status_json(runtime)["leases"] == []


def test_sigkilled_export_holder_ends_its_lease(runtime: Runtime, daemon) -> None:
    holder = holder_process(runtime)
    lease = export_lease(runtime, holder.pid)
    bindspace = Path(lease["bindspace"])
    assert bindspace.is_dir()
    kill_tree(holder.pid)
    wait_for(lambda: not bindspace.exists(), what="the bindspace to go")
    assert tcp_binds(lease["port"])
    assert status_json(runtime)["leases"] == []


def test_port_of_a_killed_holder_returns_to_the_pool(runtime: Runtime) -> None:
    port = int(private_pool(1).split("-")[0])
    runtime.start_daemon("--port-pool", f"{port}-{port}")
    for _ in range(2):
        held = hold(runtime)
        assert held.port == port
        sigkill(held)
        wait_for(lambda: not held.bindspace.exists(), what="the bindspace to go")


def test_exhausted_port_pool_is_a_clear_error_and_the_daemon_survives(runtime: Runtime) -> None:
    port = int(private_pool(1).split("-")[0])
    daemon = runtime.start_daemon("--port-pool", f"{port}-{port}")
    holder = holder_process(runtime)
    first = export_lease(runtime, holder.pid)
    assert first["port"] == port

    res = runtime.cli("lease", "--export", "--holder-pid", str(holder.pid))
    assert res.returncode != 0
    assert "no free port" in res.stderr, res.stderr
    assert pid_alive(daemon.pid), "the daemon died"
    assert [i["lease_id"] for i in status_json(runtime)["leases"]] == [first["lease_id"]]
    assert len(runtime.bindspaces()) == 1  # the refused lease left nothing


def test_exhausted_pool_keeps_the_asking_connection_and_its_leases(runtime: Runtime) -> None:
    """A library client holding a connection-bound lease asks for a second
    one when no port is left: it gets a refusal, not a dropped connection
    (which would also end the lease it already holds)."""
    port = int(private_pool(1).split("-")[0])
    runtime.start_daemon("--port-pool", f"{port}-{port}")
    with connect(autostart=False, environ=runtime.env) as conn:
        first = conn.lease("tcp")
        assert first.lease.port == port
        with pytest.raises(ClientError) as info:
            conn.lease("tcp")
        assert info.value.code not in ("internal", "unreachable"), (info.value.code, str(info.value))
        assert "port" in str(info.value)
        # Same connection, still usable, first lease still live.
        assert [i.lease_id for i in conn.status().leases] == [first.lease.lease_id]
        assert Path(first.lease.bindspace).is_dir()
        # A uds lease needs no port: still granted.
        uds = conn.lease("uds")
        conn.release(uds.lease.lease_id)
    wait_for(lambda: not Path(first.lease.bindspace).exists(), what="the connection-bound lease to end")


def test_releasing_a_running_command_s_lease_ends_the_command(runtime: Runtime, daemon) -> None:
    held = hold(runtime)
    res = runtime.cli("release", held.rtvars._session_uuid)
    assert res.returncode == 0, res.stderr
    assert not held.bindspace.exists()
    # The daemon ended the session's processes (SIGINT): the command died
    # of KeyboardInterrupt, and the CLI reports that as 128+SIGINT.
    assert held.cli.wait(timeout=DEADLINE) == 128 + signal.SIGINT
    assert not pid_alive(held.pid)
    assert status_json(runtime)["leases"] == []


# The leased command starts a leftover (in a new session, so no process
# group kill reaches it) that starts a grandchild without the envelope, then
# exits without waiting for either.  argv: OUT MODE (polite: SIGINT ends the
# leftover; stubborn: it ignores SIGINT).
LEAVE_BEHIND = r"""
import json, os, subprocess, sys
out, mode = sys.argv[1], sys.argv[2]
grandchild = ("import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN);"
              " print('ready', flush=True); sys.stdin.read()")
leftover = (
    "import os, signal, subprocess, sys\n"
    + ("signal.signal(signal.SIGINT, signal.SIG_IGN)\n" if mode == "stubborn" else "")
    + "env = {k: v for k, v in os.environ.items() if k != '_TRACTOR_RT_VARS'}\n"
    + f"g = subprocess.Popen([sys.executable, '-c', {grandchild!r}], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)\n"
    + "g.stdout.readline()\n"
    + "print(g.pid, flush=True)\n"
    + "while True: signal.pause()\n"
)
child = subprocess.Popen(
    [sys.executable, "-c", leftover], start_new_session=True,
    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
)
grandchild_pid = int(child.stdout.readline())
with open(out, "w") as f:
    json.dump({"leftover": child.pid, "grandchild": grandchild_pid}, f)
"""


def leave_behind(runtime: Runtime, *lease_args: str, mode: str = "polite") -> dict[str, int]:
    """Run LEAVE_BEHIND in a lease; return the pids it left behind."""
    out = runtime.base / f"leftovers-{uuid.uuid4().hex}.json"
    res = runtime.cli("lease", *lease_args, "--", sys.executable, "-c", LEAVE_BEHIND, str(out), mode)
    assert res.returncode == 0, res.stderr
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", ["polite", "stubborn"])
def test_leftover_processes_are_ended_with_the_lease(runtime: Runtime, pool: str, mode: str) -> None:
    runtime.start_daemon("--port-pool", pool, "--reap-grace", "0.5")
    pids = leave_behind(runtime, mode=mode)
    try:
        # Release waits for the reaping, so all is over when the CLI exits.
        assert not pid_alive(pids["leftover"]), "the leftover survived its session"
        assert not pid_alive(pids["grandchild"]), "the leftover's child survived the session"
        assert runtime.bindspaces() == []
    finally:
        kill_if_alive(*pids.values())


def test_no_reap_leaves_leftovers_running(runtime: Runtime, daemon) -> None:
    pids = leave_behind(runtime, "--no-reap")
    try:
        assert pid_alive(pids["leftover"]) and pid_alive(pids["grandchild"])
        assert runtime.bindspaces() == []
        assert status_json(runtime)["leases"] == []
    finally:
        kill_if_alive(*pids.values())


def test_no_reap_leftovers_are_spared_by_gc(runtime: Runtime, daemon) -> None:
    pids = leave_behind(runtime, "--no-reap")
    try:
        assert pid_alive(pids["leftover"])
        res = runtime.cli("gc")
        assert res.returncode == 0, res.stderr
        assert pid_alive(pids["leftover"]), "gc killed a process `lease --no-reap` promised to leave running"
        assert pid_alive(pids["grandchild"])
    finally:
        kill_if_alive(*pids.values())


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
def test_a_port_busy_in_any_family_is_not_handed_out(runtime: Runtime, family: int, kind: int, host: str) -> None:
    low = int(private_pool(2).split("-")[0])
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
        holder = holder_process(runtime)
        assert export_lease(runtime, holder.pid)["port"] == low + 1
    finally:
        busy.close()


def test_serve_refuses_a_port_pool_inside_the_ephemeral_range(runtime: Runtime) -> None:
    eph = ports.ephemeral_range()
    spec = f"{eph.start + 10}-{eph.start + 20}"
    res = runtime.cli("serve", "--root", str(runtime.root), "--port-pool", spec, timeout=DEADLINE)
    assert res.returncode != 0
    assert spec in res.stderr and "ephemeral" in res.stderr, res.stderr
    assert daemon_processes(runtime) == []


def deepest_socket_len(root: Path) -> int:
    """Length of the deepest socket path tractor may create in a bindspace
    of ``root``: <root>/<12 hex>/tractor/actor.<32 hex>@<7 digits>.sock."""
    bindspace = root / ("0" * 12)
    return len(os.fsencode(bindspace / "tractor" / f"actor.{'0' * 32}@{'9' * 7}.sock"))


@pytest.mark.parametrize("deepest", [paths.AF_UNIX_PATH_MAX - 1, paths.AF_UNIX_PATH_MAX])
def test_bindspace_socket_paths_must_fit_af_unix(runtime: Runtime, pool: str, deepest: int) -> None:
    filler = deepest - deepest_socket_len(runtime.base / "r")
    if filler < 0:
        pytest.skip("the temp dir is too deep for this boundary")
    root = runtime.base / ("r" * (1 + filler))
    assert deepest_socket_len(root) == deepest
    start_daemon_at(runtime, root, "--port-pool", pool)
    env = {**runtime.env, paths.ROOT_ENV: str(root)}

    res = runtime.cli("lease", "--export", "--json", "--holder-pid", str(holder_process(runtime).pid), env=env)
    if deepest < paths.AF_UNIX_PATH_MAX:  # fits, NUL included: granted, and really bindable
        assert res.returncode == 0, res.stderr
        tractor_dir = Path(json.loads(res.stdout)["bindspace"]) / "tractor"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(str(tractor_dir / f"actor.{'a' * 32}@1234567.sock"))
    else:
        assert res.returncode != 0
        assert "too long" in res.stderr and str(root) in res.stderr, res.stderr
        assert [p for p in root.iterdir()] == []  # no lease left behind
        assert json.loads(runtime.cli("status", "--json", env=env).stdout)["leases"] == []


# -- 10. protocol garbage -----------------------------------------------------


def exchange(runtime: Runtime, data: bytes, shut_wr: bool = True, timeout: float = DEADLINE) -> list[protocol.Reply]:
    """Send raw bytes; return the replies read until the daemon closes the
    connection (failing if it neither answers nor closes in time)."""
    deadline = time.monotonic() + timeout
    buf = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(runtime.socket))
        sock.sendall(data)
        if shut_wr:
            sock.shutdown(socket.SHUT_WR)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the daemon neither answered nor closed within {timeout} s (got {buf!r})")
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            buf += chunk
    replies = []
    while buf:
        (length,) = HEADER.unpack(buf[: HEADER.size])
        replies.append(decode_reply(buf[HEADER.size : HEADER.size + length]))
        buf = buf[HEADER.size + length :]
    return replies


def raw_frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


GARBAGE = {
    "random-bytes": (random.Random(2).randbytes(512), True),
    "oversized-length-prefix": (b"\xff\xff\xff\xff", False),
    "undecodable-body": (raw_frame(b"\xc1" * 16), False),
    "truncated-frame": (HEADER.pack(100) + b"x" * 10, True),
    "request-before-hello": (frame(StatusRequest()), False),
    "unknown-message-type": (
        frame(Hello(version=PROTOCOL_VERSION)) + raw_frame(msgspec.json.encode({"type": "launch_missiles", "n": 1})),
        False,
    ),
    "hello-twice": (frame(Hello(version=PROTOCOL_VERSION)) * 2, False),
    # JSON cannot carry an infinite ttl; a number past a double's range is
    # the nearest a client can send.
    "out-of-range-number": (
        frame(Hello(version=PROTOCOL_VERSION)) + raw_frame(b'{"type":"lease","transport":"uds","ttl":1e999}'),
        False,
    ),
}


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_protocol_garbage_is_refused_and_the_daemon_keeps_serving(runtime: Runtime, daemon, kind: str) -> None:
    before = hold(runtime)  # a client in the middle of its lease
    data, shut_wr = GARBAGE[kind]

    replies = exchange(runtime, data, shut_wr=shut_wr)
    welcomes = [r for r in replies if isinstance(r, Welcome)]
    errors = [r for r in replies if isinstance(r, Error)]
    assert len(welcomes) + len(errors) == len(replies), replies
    if kind in ("unknown-message-type", "hello-twice"):
        assert len(welcomes) == 1
    if kind != "random-bytes":  # random bytes: an error reply or a plain close
        assert [e.code for e in errors] == ["protocol"], replies
        assert errors[0].message

    assert pid_alive(daemon.pid)
    res = runtime.cli("lease", "--", "true")
    assert res.returncode == 0, res.stderr
    assert before.bindspace.is_dir()  # the other client's lease is intact
    assert before.finish() == 0
    assert runtime.bindspaces() == []


def test_wrong_protocol_version_gets_a_version_error_not_a_hang(runtime: Runtime, daemon) -> None:
    replies = exchange(runtime, frame(Hello(version=PROTOCOL_VERSION + 1)), shut_wr=False)
    assert len(replies) == 1 and isinstance(replies[0], Error), replies
    assert replies[0].code == "version"
    assert str(PROTOCOL_VERSION + 1) in replies[0].message
    assert str(PROTOCOL_VERSION) in replies[0].message
    assert runtime.cli("lease", "--", "true").returncode == 0


def test_newer_client_hello_with_extra_fields_gets_a_version_error(runtime: Runtime, daemon) -> None:
    body = msgspec.json.encode(
        {"type": "hello", "version": PROTOCOL_VERSION + 1, "client": "tractor-session", "features": ["x"]}
    )
    replies = exchange(runtime, raw_frame(body), shut_wr=False)
    assert len(replies) == 1 and isinstance(replies[0], Error), replies
    assert replies[0].code == "version", replies[0]


def test_silent_clients_do_not_hold_up_others(runtime: Runtime, pool: str) -> None:
    request_timeout = 30.0
    daemon = runtime.start_daemon("--port-pool", pool, "--request-timeout", str(request_timeout))
    silent = []
    try:
        for _ in range(100):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            silent.append(sock)
            sock.connect(str(runtime.socket))
        start = time.monotonic()
        assert status_json(runtime)["daemon_pid"] == daemon.pid
        res = runtime.cli("lease", "--", "true")
        elapsed = time.monotonic() - start
        assert res.returncode == 0, res.stderr
        # Served right away, not after the silent ones timed out.
        assert elapsed < request_timeout, elapsed
    finally:
        for sock in silent:
            sock.close()


def test_silent_client_is_disconnected_after_the_request_timeout(runtime: Runtime, pool: str) -> None:
    runtime.start_daemon("--port-pool", pool, "--request-timeout", "1")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(str(runtime.socket))
        start = time.monotonic()
        # Meanwhile others are served.
        assert runtime.cli("lease", "--", "true").returncode == 0
        silent.settimeout(DEADLINE)
        buf = b""
        try:
            while chunk := silent.recv(65536):
                buf += chunk
        except ConnectionResetError:
            pass
        elapsed = time.monotonic() - start
    assert elapsed < DEADLINE
    if buf:  # an error reply is allowed before the close
        (length,) = HEADER.unpack(buf[: HEADER.size])
        reply = decode_reply(buf[HEADER.size : HEADER.size + length])
        assert isinstance(reply, Error) and reply.code == "protocol", reply
    # A client that stalls mid-request is cut off too.
    replies = exchange(runtime, HEADER.pack(100) + b"x" * 10, shut_wr=False)
    assert [r.code for r in replies if isinstance(r, Error)] == ["protocol"], replies


# -- 11. unsafe directories ---------------------------------------------------

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


needs_root = pytest.mark.skipif(os.getuid() != 0, reason="chown to another uid needs root")


def unsafe_params() -> list[Any]:
    return [pytest.param(k, marks=needs_root if k == "foreign-owned" else ()) for k in UNSAFE]


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


def test_second_serve_exits_naming_the_running_daemon(runtime: Runtime, daemon) -> None:
    res = runtime.cli("serve", "--root", str(runtime.root), timeout=DEADLINE)
    assert res.returncode != 0
    assert f"pid {daemon.pid}" in res.stderr, res.stderr
    assert pid_alive(daemon.pid)
    assert [p.pid for p in daemon_processes(runtime)] == [daemon.pid]
    assert runtime.cli("lease", "--", "true").returncode == 0


# -- 12. help -----------------------------------------------------------------


@pytest.mark.parametrize("sub", ["lease", "status", "release", "renew", "serve"])
def test_help_of_every_subcommand_has_an_example(runtime: Runtime, sub: str) -> None:
    res = runtime.cli(sub, "--help")
    assert res.returncode == 0, res.stderr
    assert "example" in res.stdout
    assert re.search(rf"^\s+tractor-session {sub}\b", res.stdout, re.MULTILINE), res.stdout


# -- 13. the client stays light -----------------------------------------------


def imported_modules(argv: list[str], env: dict[str, str]) -> set[str]:
    """The top-level packages ``python -X importtime ARGV`` imports."""
    res = subprocess.run([sys.executable, "-X", "importtime", *argv], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return {line.rpartition("|")[2].strip().partition(".")[0] for line in res.stderr.splitlines()}


@pytest.mark.parametrize("with_daemon", [True, False], ids=["daemon-running", "cold-start"])
def test_lease_command_imports_nothing_heavy(runtime: Runtime, pool: str, with_daemon: bool) -> None:
    """`lease -- CMD` runs before every test run: no trio or psutil ever,
    and with a daemon running no msgspec, typing or pathlib either (each
    costs milliseconds; the lease itself costs about one).  What the
    interpreter imports at start-up (a site hook, say) is not ours."""
    if with_daemon:
        runtime.start_daemon("--port-pool", pool)
    try:
        ours = imported_modules(["-m", "tractor_session", "lease", "--", "true"], runtime.env)
    finally:
        stop_autostarted_daemon(runtime)
    assert "tractor_session" in ours  # importtime did report
    heavy = {"trio", "psutil"} | ({"msgspec", "typing", "pathlib"} if with_daemon else set())
    assert (ours - imported_modules(["-c", "pass"], runtime.env)) & heavy == set()
