"""What ends a lease: its holder's death (a SIGKILLed holder, a SIGKILLed
``lease`` CLI, both at once), a ttl that runs out unless renewed, and a
release; and what an ended lease gives back (its bindspace, its port, the
processes of its session).

Real daemon processes, real holder processes and real SIGKILLs; nothing of
ours is mocked.  Outcomes are asserted (a bindspace gone, a process dead, a
port bindable, what ``status`` lists) and every wait is a deadline-bounded
``wait_for``, never a sleep.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import (
    DEADLINE,
    KEEPS_FORKING,
    QUICK_REAP,
    RECLAIM,
    SLEEP,
    Runtime,
    carrying,
    export_lease,
    hold,
    kill_if_alive,
    lease_env,
    live_leases,
    pid_alive,
    port_bindable,
    private_pool,
    read_record,
    sigkill,
    start_lease_cmd,
    status_json,
    wait_for,
)

from tractor_session.run import SESSION_ENDED

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and pidfds")


# -- the holder dies ---------------------------------------------------------------

# Runs in a new session (re-parented to init once the holder dies), carries
# the envelope, ignores SIGINT (so only the SIGKILL escalation ends it), and
# has a child of its own whose environment no longer carries the envelope:
# it must go too, as a descendant.
GRANDCHILD = r"""
import os, signal, subprocess, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
scrubbed = {k: v for k, v in os.environ.items() if k != "_TRACTOR_RT_VARS"}
kid = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(1000)"], env=scrubbed,
    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
)
print(os.getpid(), kid.pid, flush=True)
while True:
    signal.pause()
"""


# Reads the envelope (JSON, one line) on stdin, spawns GRANDCHILD with it in
# a new session, writes "holder grandchild great-grandchild" pids to argv[1],
# then blocks.
HOLDER = r"""
import json, os, subprocess, sys
pidfile, grandchild_code = sys.argv[1], sys.argv[2]
env = json.loads(sys.stdin.readline())
gc = subprocess.Popen(
    [sys.executable, "-c", grandchild_code], env=env, start_new_session=True,
    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
)
line = gc.stdout.readline().decode().strip()
with open(pidfile + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {line}\n")
os.rename(pidfile + ".tmp", pidfile)
sys.stdin.read()
"""


def test_sigkilled_holder_frees_bindspace_port_and_reaps_grandchildren(runtime: Runtime, strays: list[psutil.Process]) -> None:
    port = private_pool(1).low
    # A pool of one port: getting it again proves it went back to the pool.
    runtime.start_daemon(*QUICK_REAP, "--port-pool", f"{port}-{port}")
    pidfile = runtime.base / "pids"
    holder = runtime.holder([sys.executable, "-c", HOLDER, str(pidfile), GRANDCHILD])
    lease = export_lease(runtime, holder.pid)
    bindspace = Path(lease["bindspace"])
    assert lease["port"] == port and lease["holder_pid"] == holder.pid
    assert bindspace.is_dir()
    # A second lease of the same holder (uds: the one port is taken) ends too.
    second = Path(export_lease(runtime, holder.pid, "--tpt-proto", "uds")["bindspace"])

    assert holder.stdin is not None
    holder.stdin.write(json.dumps(lease_env(runtime, lease)).encode() + b"\n")
    holder.stdin.flush()
    wait_for(pidfile.exists, what="the holder's pid file")
    holder_pid, gc_pid, ggc_pid = map(int, pidfile.read_text().split())
    assert holder_pid == holder.pid
    family = [psutil.Process(gc_pid), psutil.Process(ggc_pid)]
    strays.extend(family)
    assert all(p.is_running() for p in family)
    assert os.getsid(gc_pid) != os.getsid(holder.pid), "the grandchild must be in a session of its own"
    assert lease["lease_id"] in family[0].environ().get("_TRACTOR_RT_VARS", "")
    assert "_TRACTOR_RT_VARS" not in family[1].environ()

    holder.kill()
    holder.wait()

    wait_for(lambda: not bindspace.exists(), RECLAIM, "the dead holder's bindspace to be removed")
    wait_for(lambda: not second.exists(), RECLAIM, "the dead holder's other bindspace to be removed")
    wait_for(lambda: not any(pid_alive(p.pid) for p in family), RECLAIM, "the re-parented grandchildren to die")
    assert lease["lease_id"] not in live_leases(runtime)
    assert status_json(runtime) == []
    assert port_bindable(port)
    # The port is back in the (one-port) pool: a new lease gets it.
    other = runtime.holder()
    again = export_lease(runtime, other.pid)
    assert again["port"] == port
    assert again["bindspace"] != lease["bindspace"]


def test_sigkilled_lease_cli_ends_lease_and_reaps_cmd(runtime: Runtime, strays: list[psutil.Process]) -> None:
    runtime.start_daemon(*QUICK_REAP)
    cli, cmd, bindspace, lease_id = start_lease_cmd(runtime, cmd=[sys.executable, "-c", SLEEP], stdin=subprocess.DEVNULL)
    strays.append(cmd)
    assert lease_id in cmd.environ().get("_TRACTOR_RT_VARS", "")

    cli.kill()
    cli.wait()

    wait_for(lambda: not bindspace.exists(), RECLAIM, "the lease of the killed CLI to end")
    wait_for(lambda: not pid_alive(cmd.pid), RECLAIM, "the orphaned CMD to be reaped")
    assert lease_id not in live_leases(runtime)
    assert status_json(runtime) == []


def test_what_the_session_starts_while_it_ends_is_ended_before_it_is_freed(runtime: Runtime) -> None:
    runtime.start_daemon(*QUICK_REAP)
    cli, _, bindspace, lease_id = start_lease_cmd(runtime, cmd=["sh", "-c", KEEPS_FORKING], stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(carrying(lease_id)) > 3, what="the command to start processes")
        cli.kill()
        cli.wait()
        wait_for(lambda: not bindspace.exists(), RECLAIM, "the lease of the killed CLI to end")
        # Its directory (and port) are freed only once nothing of it runs.
        survivors = carrying(lease_id)
        assert not survivors, f"{len(survivors)} processes of the session outlived it: {survivors}"
    finally:
        kill_if_alive(*(p.pid for p in carrying(lease_id)))


# Waits for an environment (JSON, one line) on stdin, then becomes `sleep`
# with it: a process older than the lease joins its session by execve
# alone, creating no process.
EXEC_INTO = r"""
import json, os, shutil, sys
env = json.loads(sys.stdin.readline())
os.execve(shutil.which("sleep"), ["sleep", "1000"], env)
"""


def test_a_process_that_execs_into_the_session_ends_with_it(runtime: Runtime) -> None:
    runtime.start_daemon(*QUICK_REAP)
    joiner = runtime.popen([sys.executable, "-c", EXEC_INTO], stdin=subprocess.PIPE)
    holder = runtime.holder()
    lease = export_lease(runtime, holder.pid)
    assert joiner.stdin is not None
    joiner.stdin.write(json.dumps(lease_env(runtime, lease)).encode() + b"\n")
    joiner.stdin.flush()
    wait_for(lambda: [p.pid for p in carrying(lease["lease_id"])] == [joiner.pid], what="the joiner to exec into the session")

    holder.kill()
    holder.wait()

    wait_for(lambda: not Path(lease["bindspace"]).exists(), RECLAIM, "the dead holder's lease to end")
    assert not pid_alive(joiner.pid), "a process that joined the session by execve outlived it"


def test_sigkilled_cli_and_command_end_the_lease_and_give_the_port_back(runtime: Runtime) -> None:
    """Both killed at once, twice over a pool of one port: getting the port
    again proves it went back to the pool."""
    port = private_pool(1).low
    runtime.start_daemon("--port-pool", f"{port}-{port}")
    for _ in range(2):
        held = hold(runtime)
        assert held.port == port
        assert held.bindspace.is_dir()
        sigkill(held)
        wait_for(lambda: not held.bindspace.exists(), what="the bindspace to go")
        assert port_bindable(port, "127.0.0.1", (socket.SOCK_STREAM,))
        assert status_json(runtime) == []


# -- a ttl ---------------------------------------------------------------------------


def test_ttl_lease_expires_and_renewed_one_does_not(runtime: Runtime) -> None:
    runtime.start_daemon(*QUICK_REAP)
    holder = runtime.holder()
    short = export_lease(runtime, holder.pid, "--ttl", "1")
    long = export_lease(runtime, holder.pid, "--ttl", "2")
    t0 = time.monotonic()   # after the grant: its expiry is at most t0 + 2
    short_dir, long_dir = Path(short["bindspace"]), Path(long["bindspace"])
    first_expiry = long["expires"]

    # Renew the 2 s lease every half second, well past its original expiry.
    renewals = 0
    while time.monotonic() < t0 + 3.5:
        r = runtime.cli("renew", long["lease_id"], "--ttl", "2")
        assert r.returncode == 0, r.stderr
        renewals += 1
        assert long_dir.is_dir(), f"renewed lease ended after {time.monotonic() - t0:.1f} s"
        mark = time.monotonic()
        wait_for(lambda: time.monotonic() > mark + 0.5, what="the next renewal time")
    assert renewals >= 3
    assert time.time() > first_expiry + 1
    assert long_dir.is_dir()
    assert read_record(long_dir)["expires"] > first_expiry
    assert long["lease_id"] in live_leases(runtime)

    # The unrenewed one expired although its holder lives.
    wait_for(lambda: not short_dir.exists(), RECLAIM, "the 1 s lease to expire")
    assert short["lease_id"] not in live_leases(runtime)
    assert pid_alive(holder.pid)

    # Once renewals stop, the renewed one expires too.
    wait_for(lambda: not long_dir.exists(), RECLAIM, "the renewed lease to expire")
    assert pid_alive(holder.pid)


# -- a release -----------------------------------------------------------------------


@pytest.mark.parametrize("by", ["full-id", "prefix"])
def test_release_ends_an_exported_lease(runtime: Runtime, daemon, by: str) -> None:
    holder = runtime.holder()
    lease = export_lease(runtime, holder.pid)
    lease_id = lease["lease_id"]
    bindspace = Path(lease["bindspace"])
    assert bindspace.is_dir()
    assert [i["lease_id"] for i in status_json(runtime)] == [lease_id]

    name = lease_id if by == "full-id" else lease_id.replace("-", "")[:12]
    res = runtime.cli("release", name)
    assert res.returncode == 0, res.stderr
    assert lease_id in res.stdout
    assert not bindspace.exists()
    assert status_json(runtime) == []
    assert pid_alive(holder.pid)  # the holder itself is not the session's to kill

    # Releasing it again: by its full id the daemon still says who ended
    # it; a prefix names no live lease any more.
    again = runtime.cli("release", name)
    assert again.returncode != 0
    if by == "full-id":
        assert "has ended: released by pid" in again.stderr and "tractor_session release" in again.stderr, again.stderr
    else:
        assert "no live lease" in again.stderr and name in again.stderr


def test_releasing_a_running_command_s_lease_ends_the_command(runtime: Runtime, daemon) -> None:
    held = hold(runtime)
    res = runtime.cli("release", held.rtvars._session_uuid)
    assert res.returncode == 0, res.stderr
    assert not held.bindspace.exists()
    # The daemon ended the session's processes (SIGINT), the command with
    # them; `lease` exits with the status that says the session was ended
    # under its command, not with the command's own.
    assert held.cli.wait(timeout=DEADLINE) == SESSION_ENDED
    assert not pid_alive(held.pid)
    assert status_json(runtime) == []
