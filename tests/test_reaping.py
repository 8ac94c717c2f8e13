"""Leftover processes are ended with their session: what a leased command
leaves behind (detached, stubborn, or a grandchild without the envelope) is
SIGINTed, then SIGKILLed, when the lease ends, and the CLI says what it
reaped; ``--no-reap`` leaves them running; reaping spares other sessions,
other users, and the process that asked for the release.

Real daemon processes and real leftover processes found through their
environment, as the daemon finds them; nothing of ours is mocked.  Every
wait is a deadline-bounded ``wait_for``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest
from conftest import (
    IS_ROOT,
    KEEPS_FORKING,
    NOBODY,
    QUICK_REAP,
    RECLAIM,
    SLEEP,
    PortPool,
    Runtime,
    carrying,
    export_lease,
    kill_if_alive,
    lease_env,
    live_leases,
    pid_alive,
    status_json,
    wait_for,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and pidfds")
PY = sys.executable


# -- a session's leftovers end with it ------------------------------------------------

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


def leave_behind(runtime: Runtime, *lease_args: str, mode: str = "polite") -> tuple[dict[str, int], list[str]]:
    """Run LEAVE_BEHIND in a lease; return the pids it left behind and the
    lines of the CLI's stderr that report reaping."""
    out = runtime.base / f"leftovers-{uuid.uuid4().hex}.json"
    res = runtime.cli("lease", *lease_args, "--", sys.executable, "-c", LEAVE_BEHIND, str(out), mode)
    assert res.returncode == 0, res.stderr
    return json.loads(out.read_text()), [line for line in res.stderr.splitlines() if "reaped" in line]


@pytest.mark.parametrize("mode", ["polite", "stubborn"])
def test_leftover_processes_are_ended_with_the_lease(runtime: Runtime, pool: PortPool, mode: str) -> None:
    runtime.start_daemon("--port-pool", str(pool), *QUICK_REAP)
    pids, summary = leave_behind(runtime, mode=mode)
    try:
        # Release waits for the reaping, so all is over when the CLI exits.
        assert not pid_alive(pids["leftover"]), "the leftover survived its session"
        assert not pid_alive(pids["grandchild"]), "the leftover's child survived the session"
        assert runtime.bindspaces() == []
        # ... and the CLI says so, in one line naming what it reaped.
        assert len(summary) == 1, summary
        assert str(pids["leftover"]) in summary[0], summary
    finally:
        kill_if_alive(*pids.values())


# Started with a session's envelope: starts N `sleep`s, prints their pids,
# then waits to be ended with them.
SPAWN_MANY = r"""
import subprocess, sys
kids = [subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL) for _ in range(int(sys.argv[1]))]
print(" ".join(str(k.pid) for k in kids), flush=True)
sys.stdin.read()
"""


def test_hundreds_of_leftovers_are_all_reaped(runtime: Runtime) -> None:
    """The scan walks one process tree however many it finds (the time it
    takes is the benchmark's: scripts/bench.py --only leftovers)."""
    runtime.start_daemon(*QUICK_REAP)
    lease = export_lease(runtime, runtime.holder().pid)
    spawner = runtime.popen(
        [PY, "-c", SPAWN_MANY, "400"], env=lease_env(runtime, lease),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
    )
    assert spawner.stdout is not None
    pids = [int(pid) for pid in spawner.stdout.readline().split()]
    try:
        assert len(pids) == 400
        r = runtime.cli("release", lease["lease_id"])
        assert r.returncode == 0, r.stderr
        # The release answers once its session's processes are gone.
        survivors = [pid for pid in pids if pid_alive(pid)]
        assert not survivors, f"{len(survivors)} of 400 leftovers survived the release"
        assert not Path(lease["bindspace"]).exists()
    finally:
        kill_if_alive(*pids)


def test_no_reap_leaves_leftovers_running(runtime: Runtime, daemon) -> None:
    pids, summary = leave_behind(runtime, "--no-reap")
    try:
        assert pid_alive(pids["leftover"]) and pid_alive(pids["grandchild"])
        assert runtime.bindspaces() == []
        assert status_json(runtime) == []
        assert summary == [], "--no-reap: nothing is reaped, so nothing is reported"
    finally:
        kill_if_alive(*pids.values())


def test_no_reap_leftovers_are_spared_by_gc(runtime: Runtime, daemon) -> None:
    pids, _ = leave_behind(runtime, "--no-reap")
    try:
        assert pid_alive(pids["leftover"])
        res = runtime.cli("gc")
        assert res.returncode == 0, res.stderr
        assert pid_alive(pids["leftover"]), "gc killed a process `lease --no-reap` promised to leave running"
        assert pid_alive(pids["grandchild"])
    finally:
        kill_if_alive(*pids.values())


def test_gc_ends_what_a_dead_session_starts_while_it_is_ended(runtime: Runtime, pool: PortPool) -> None:
    """A process joins a session after its end (a stale envelope) and keeps
    forking, SIGINT or not: the daemon's gc leaves nothing of it."""
    runtime.start_daemon("--port-pool", str(pool), *QUICK_REAP)
    lease = export_lease(runtime, runtime.holder().pid)
    released = runtime.cli("release", lease["lease_id"])
    assert released.returncode == 0, released.stderr
    runtime.popen(["sh", "-c", KEEPS_FORKING], env=lease_env(runtime, lease), start_new_session=True,
                  stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(carrying(lease["lease_id"])) > 3, what="the stale session to start processes")
        collected = runtime.cli("gc")
        assert collected.returncode == 0, collected.stderr
        assert "through the daemon" in collected.stdout
        survivors = carrying(lease["lease_id"])
        assert not survivors, f"{len(survivors)} processes of the dead session outlived gc: {survivors}"
    finally:
        kill_if_alive(*(p.pid for p in carrying(lease["lease_id"])))


# -- and only its leftovers ---------------------------------------------------------------


def test_reaping_spares_other_sessions_and_other_users(runtime: Runtime) -> None:
    runtime.start_daemon(*QUICK_REAP)
    holder_a, holder_b, holder_c = runtime.holder(), runtime.holder(), runtime.holder()
    lease_a = export_lease(runtime, holder_a.pid)
    lease_b = export_lease(runtime, holder_b.pid)
    lease_c = export_lease(runtime, holder_c.pid, "--no-reap")
    env_a, env_b = lease_env(runtime, lease_a), lease_env(runtime, lease_b)
    detached = dict(start_new_session=True, stdin=subprocess.DEVNULL)
    left_a = runtime.popen([sys.executable, "-c", SLEEP], env=env_a, **detached)
    left_b = runtime.popen([sys.executable, "-c", SLEEP], env=env_b, **detached)
    left_c = runtime.popen([sys.executable, "-c", SLEEP], env=lease_env(runtime, lease_c), **detached)
    foreign = runtime.popen(
        ["sleep", "1000"], env=env_a, user=NOBODY, cwd="/",
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    ) if IS_ROOT else None
    for p in (left_a, left_b, left_c, foreign):
        if p is not None:
            wait_for(lambda: "_TRACTOR_RT_VARS" in psutil.Process(p.pid).environ(),
                     what=f"pid {p.pid} to run with its envelope")

    r = runtime.cli("release", lease_a["lease_id"])
    assert r.returncode == 0, r.stderr

    wait_for(lambda: not pid_alive(left_a.pid), RECLAIM, "session A's leftover process to be reaped")
    assert not Path(lease_a["bindspace"]).exists()
    assert pid_alive(left_b.pid), "another session's process was reaped"
    assert pid_alive(holder_b.pid) and pid_alive(holder_a.pid)
    if foreign is not None:
        assert pid_alive(foreign.pid), "another user's process was reaped"
    assert Path(lease_b["bindspace"]).is_dir()

    # A --no-reap session's processes outlive it, even when its holder dies.
    holder_c.kill()
    holder_c.wait()
    wait_for(lambda: not Path(lease_c["bindspace"]).exists(), RECLAIM, "the --no-reap lease to end")
    assert pid_alive(left_c.pid), "--no-reap: the session's process was reaped"
    assert pid_alive(left_b.pid)
    assert set(live_leases(runtime)) == {lease_b["lease_id"]}


def test_release_from_inside_the_session_spares_the_requester(runtime: Runtime) -> None:
    """The script pattern: a shell leases with --export, runs things, then
    releases its own lease.  The shell and the releasing CLI carry the
    session's envelope, yet the release must not reap them; a leftover
    child of the script is reaped as usual."""
    runtime.start_daemon(*QUICK_REAP)
    leftover = runtime.base / "leftover.pid"
    script = f"""
        eval "$({PY} -m tractor_session lease --export)"
        {PY} -c 'import os, sys, time; open(sys.argv[1], "w").write(str(os.getpid())); time.sleep(1000)' {leftover} &
        while [ ! -s {leftover} ]; do :; done
        {PY} -m tractor_session release "$TRACTOR_SESSION_ID"
        echo "release exited $?"
    """
    done = subprocess.run(["sh", "-c", script], env=runtime.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "release exited 0" in done.stdout, done.stdout + done.stderr
    assert runtime.bindspaces() == []
    child = int(leftover.read_text())
    wait_for(lambda: not pid_alive(child), RECLAIM, "the script's leftover child to be reaped")
