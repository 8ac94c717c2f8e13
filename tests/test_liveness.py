"""Integration tests for issue 3: leases that survive crashes.

Holder liveness, TTLs, pid reuse, refused holders, daemon SIGKILL/SIGTERM
and restart with re-adoption, the one-daemon lock, and reaping a dead
session's processes (and only those).

Everything here is real: real daemon processes (``tractor-session serve``),
real holder processes, real SIGKILLs.  We assert on outcomes (a bindspace
gone, a process dead, a port bindable, what ``status`` lists), and we never
sleep to synchronise: :func:`wait_for` polls against a deadline.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tractor_session import client
from tractor_session.protocol import LeaseInfo

from conftest import DEADLINE, Runtime, pid_alive, wait_for

PY = sys.executable
RECORD = ".tractor-session-lease"
# How long a dead session may take to be cleaned up (reap grace is 0.5 s).
RECLAIM = 10.0
GRACE = ("--reap-grace", "0.5")
IS_ROOT = os.geteuid() == 0
NOBODY = 65534
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root to start a process of another user")

# A process that lives until its stdin closes (or it is killed).
BLOCK = "import sys; sys.stdin.read()"
# A process that lives until it is signalled; SIGINT ends it (KeyboardInterrupt).
SLEEP = "import time; time.sleep(1000)"


# -- helpers --------------------------------------------------------------------


@pytest.fixture
def strays() -> Iterator[list[psutil.Process]]:
    """Processes that escape ``runtime.popen``'s teardown (re-parented to
    init): SIGKILLed at teardown if still running.  psutil.Process remembers
    the start time, so a reused pid is never hit."""
    procs: list[psutil.Process] = []
    yield procs
    for proc in procs:
        try:
            if proc.is_running():
                proc.kill()
        except psutil.Error:
            pass


def blocker(runtime: Runtime, env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen[bytes]:
    """A long-lived holder process (no envelope unless ``env`` has one)."""
    return runtime.popen([PY, "-c", BLOCK], env=env, stdin=subprocess.PIPE, **kw)


def nobody_sleeper(runtime: Runtime, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A long-lived process of another user (uid 65534)."""
    return runtime.popen(
        ["sleep", "1000"], env=env, user=NOBODY, cwd="/",
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def lease_json(runtime: Runtime, holder_pid: int, *extra: str) -> dict:
    r = runtime.cli("lease", "--json", "--holder-pid", str(holder_pid), *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def session_env(runtime: Runtime, lease: dict) -> dict[str, str]:
    return {**runtime.env, **lease["env"], "TRACTOR_SESSION_ID": lease["lease_id"]}


def live_leases(runtime: Runtime) -> dict[str, LeaseInfo]:
    with client.connect(autostart=False, environ=runtime.env) as conn:
        return {info.lease_id: info for info in conn.status().leases}


def daemon_serves(runtime: Runtime) -> int | None:
    """The pid of the daemon answering on the control socket, if any."""
    try:
        with client.connect(autostart=False, environ=runtime.env) as conn:
            return conn.status().daemon_pid
    except client.ClientError:
        return None


def read_record(bindspace: Path) -> dict | None:
    try:
        return json.loads((bindspace / RECORD).read_text())
    except (OSError, ValueError):
        return None


def port_bindable(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                return False
    return True


def spare_port() -> int:
    """A port in the daemon's default pool range that binds right now (for
    a one-port pool).  High in the range, away from other daemons' first
    picks."""
    for _ in range(200):
        port = random.randrange(27000, 30000)
        if port_bindable(port):
            return port
    raise AssertionError("no bindable port in 27000-29999")


def only_child(pid: int) -> psutil.Process | None:
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return None
    return children[0] if len(children) == 1 else None


def start_lease_cmd(runtime: Runtime, *lease_args: str, cmd: list[str], stdin: int = subprocess.PIPE,
                    ) -> tuple[subprocess.Popen[bytes], psutil.Process, Path, str]:
    """Start ``tractor-session lease [ARGS] -- CMD`` and wait until CMD runs
    and the lease is bound to CMD's pid (so a restarted daemon can follow
    it).  Returns (cli, cmd process, bindspace, lease id)."""
    before = set(runtime.bindspaces())
    cli = runtime.popen([PY, "-m", "tractor_session", "lease", *lease_args, "--", *cmd], stdin=stdin)
    new = wait_for(lambda: set(runtime.bindspaces()) - before, what="the lease's bindspace")
    (bindspace,) = new
    proc = wait_for(lambda: only_child(cli.pid), what="the CLI's command")
    wait_for(
        lambda: (rec := read_record(bindspace)) is not None and rec["holder_pid"] == proc.pid,
        what="the lease to be bound to the command's pid",
    )
    return cli, proc, bindspace, read_record(bindspace)["lease_id"]


# -- 1. a SIGKILLed holder ------------------------------------------------------

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
    port = spare_port()
    # A pool of one port: getting it again proves it went back to the pool.
    runtime.start_daemon(*GRACE, "--port-pool", f"{port}-{port}")
    pidfile = runtime.base / "pids"
    holder = runtime.popen([PY, "-c", HOLDER, str(pidfile), GRANDCHILD], stdin=subprocess.PIPE)
    lease = lease_json(runtime, holder.pid)
    bindspace = Path(lease["bindspace"])
    assert lease["port"] == port and lease["holder_pid"] == holder.pid
    assert bindspace.is_dir()
    # A second lease of the same holder (uds: the one port is taken) ends too.
    second = Path(lease_json(runtime, holder.pid, "--tpt-proto", "uds")["bindspace"])

    assert holder.stdin is not None
    holder.stdin.write(json.dumps(session_env(runtime, lease)).encode() + b"\n")
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
    assert port_bindable(port)
    # The port is back in the (one-port) pool: a new lease gets it.
    other = blocker(runtime)
    again = lease_json(runtime, other.pid)
    assert again["port"] == port
    assert again["bindspace"] != lease["bindspace"]


# -- 2. a `lease -- CMD` whose CLI is SIGKILLed ---------------------------------


def test_sigkilled_lease_cli_ends_lease_and_reaps_cmd(runtime: Runtime, strays: list[psutil.Process]) -> None:
    runtime.start_daemon(*GRACE)
    cli, cmd, bindspace, lease_id = start_lease_cmd(runtime, cmd=[PY, "-c", SLEEP], stdin=subprocess.DEVNULL)
    strays.append(cmd)
    assert lease_id in cmd.environ().get("_TRACTOR_RT_VARS", "")

    cli.kill()
    cli.wait()

    wait_for(lambda: not bindspace.exists(), RECLAIM, "the lease of the killed CLI to end")
    wait_for(lambda: not pid_alive(cmd.pid), RECLAIM, "the orphaned CMD to be reaped")
    assert lease_id not in live_leases(runtime)


# -- 3. TTL -------------------------------------------------------------------------


def test_ttl_lease_expires_and_renewed_one_does_not(runtime: Runtime) -> None:
    runtime.start_daemon(*GRACE)
    holder = blocker(runtime)
    short = lease_json(runtime, holder.pid, "--ttl", "1")
    long = lease_json(runtime, holder.pid, "--ttl", "2")
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


def test_ttl_runs_on_across_a_daemon_sigkill(runtime: Runtime) -> None:
    """A ttl lease that expired while no daemon ran is ended by the next
    daemon; one with time left is re-adopted and still expires."""
    daemon = runtime.start_daemon(*GRACE)
    holder = blocker(runtime)
    lapsed = lease_json(runtime, holder.pid, "--ttl", "1")
    running = lease_json(runtime, holder.pid, "--ttl", "4")
    daemon.kill()
    daemon.wait()
    wait_for(lambda: time.time() > lapsed["expires"], what="the 1 s lease's expiry to pass")
    assert Path(lapsed["bindspace"]).is_dir()

    runtime.start_daemon(*GRACE)
    assert running["lease_id"] in live_leases(runtime)
    wait_for(lambda: not Path(lapsed["bindspace"]).exists(), RECLAIM, "the lapsed lease to end")
    assert Path(running["bindspace"]).is_dir() or time.time() > running["expires"]
    wait_for(lambda: not Path(running["bindspace"]).exists(), RECLAIM, "the re-adopted ttl lease to expire")
    assert time.time() >= running["expires"] - 0.1
    assert pid_alive(holder.pid)


# -- 4. pid reuse -----------------------------------------------------------------


def test_reused_pid_does_not_keep_lease_alive(runtime: Runtime) -> None:
    daemon = runtime.start_daemon(*GRACE)
    stranger = blocker(runtime)   # plays the process that got the dead holder's pid
    honest = blocker(runtime)
    reused = lease_json(runtime, stranger.pid)
    control = lease_json(runtime, honest.pid)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=DEADLINE) == 0

    # Rewrite the record as if the holder that was granted the lease had
    # started earlier: its pid now names a different (live) process.
    bindspace = Path(reused["bindspace"])
    record = read_record(bindspace)
    assert record is not None and record["holder_pid"] == stranger.pid
    record["holder_start"] -= 1000.0   # whatever its unit, no longer this process's
    tmp = bindspace / (RECORD + ".test.tmp")
    tmp.write_text(json.dumps(record))
    os.chmod(tmp, 0o600)
    os.replace(tmp, bindspace / RECORD)

    runtime.start_daemon(*GRACE)
    # The matching holder's lease is re-adopted (recovery runs before the
    # daemon reports ready) ...
    leases = live_leases(runtime)
    assert control["lease_id"] in leases
    assert Path(control["bindspace"]).is_dir()
    # ... the other one is ended, and the stranger left alone.
    wait_for(lambda: not bindspace.exists(), RECLAIM, "the lease of the reused pid to end")
    assert reused["lease_id"] not in live_leases(runtime)
    assert pid_alive(stranger.pid)


# -- 5. refused holders ---------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([PY, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid


@pytest.mark.parametrize(
    "which",
    ["nonexistent", "zombie", "init", "zero", "negative", pytest.param("other-user", marks=needs_root)],
)
def test_refused_holder(runtime: Runtime, which: str) -> None:
    runtime.start_daemon(*GRACE)
    if which == "nonexistent":
        pid, words = _dead_pid(), "does not exist"
    elif which == "zombie":   # exited, not yet waited for: dead all the same
        zombie = runtime.popen([PY, "-c", "pass"])
        wait_for(lambda: psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE, what="a zombie")
        pid, words = zombie.pid, "does not exist"
    elif which == "init":
        pid, words = 1, "not allowed"
    elif which == "zero":
        pid, words = 0, "not allowed"
    elif which == "negative":
        pid, words = -5, "not allowed"
    else:
        pid, words = nobody_sleeper(runtime).pid, f"uid {NOBODY}"
    r = runtime.cli("lease", "--json", "--holder-pid", str(pid))
    assert r.returncode != 0
    assert r.stdout == ""
    message = r.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message, message
    assert f"holder pid {pid}" in message and words in message, message
    assert runtime.bindspaces() == []
    assert live_leases(runtime) == {}


# -- 6. daemon SIGKILLed holding 200 leases ------------------------------------------


def test_daemon_sigkill_with_200_leases_then_restart(runtime: Runtime) -> None:
    daemon = runtime.start_daemon(*GRACE)
    shared = [blocker(runtime) for _ in range(4)]
    doomed = [blocker(runtime) for _ in range(20)]
    with client.connect(autostart=False, environ=runtime.env) as conn:
        kept = [conn.lease(holder_pid=shared[i % len(shared)].pid) for i in range(180)]
        lost = [conn.lease(holder_pid=p.pid) for p in doomed]
    keep, lose = [g.lease for g in kept], [g.lease for g in lost]
    assert len({i.port for i in keep + lose}) == 200
    # A process of a doomed session and one of a kept session, detached and
    # carrying their envelopes: the restarted daemon must reap the first
    # with its lease and leave the second alone.
    detached = dict(start_new_session=True, stdin=subprocess.DEVNULL)
    orphan = runtime.popen([PY, "-c", SLEEP], env={**runtime.env, **lost[0].env}, **detached)
    survivor = runtime.popen([PY, "-c", SLEEP], env={**runtime.env, **kept[0].env}, **detached)
    for p in (orphan, survivor):
        wait_for(lambda: "_TRACTOR_RT_VARS" in psutil.Process(p.pid).environ(),
                 what=f"pid {p.pid} to run with its envelope")

    daemon.kill()
    daemon.wait()
    assert runtime.daemon_pid() is None
    for p in doomed:   # their holders die while no daemon runs
        p.kill()
        p.wait()
    assert all(Path(i.bindspace).is_dir() for i in keep + lose)

    runtime.start_daemon(*GRACE)
    # Recovery runs before the daemon reports ready: all live ones are back.
    assert {i.lease_id for i in keep} <= set(live_leases(runtime))
    wait_for(lambda: not any(Path(i.bindspace).exists() for i in lose), RECLAIM,
             "the leases of holders that died during the outage to end")
    wait_for(lambda: not pid_alive(orphan.pid), RECLAIM, "the dead session's leftover process to be reaped")
    assert pid_alive(survivor.pid)
    leases = live_leases(runtime)
    assert set(leases) == {i.lease_id for i in keep}
    for info in keep:
        now = leases[info.lease_id]
        assert (now.port, now.bindspace, now.holder_pid) == (info.port, info.bindspace, info.holder_pid)
        assert Path(info.bindspace).is_dir()

    kept_ports = {i.port for i in keep}
    kept_dirs = {i.bindspace for i in keep}
    with client.connect(autostart=False, environ=runtime.env) as conn:
        fresh = [conn.lease(holder_pid=shared[0].pid).lease for _ in range(200)]
    fresh_ports = {i.port for i in fresh}
    fresh_dirs = {i.bindspace for i in fresh}
    assert len(fresh_ports) == 200 and len(fresh_dirs) == 200
    assert not fresh_ports & kept_ports
    assert not fresh_dirs & kept_dirs
    assert all(Path(i.bindspace).is_dir() for i in keep)
    assert len(live_leases(runtime)) == 380


# -- 7. `lease -- CMD` survives a daemon SIGKILL -----------------------------------


def test_lease_cmd_survives_daemon_sigkill(runtime: Runtime) -> None:
    daemon = runtime.start_daemon(*GRACE)
    cli, cmd, bindspace, lease_id = start_lease_cmd(runtime, cmd=[PY, "-c", BLOCK])
    daemon.kill()
    daemon.wait()

    runtime.start_daemon(*GRACE)
    assert lease_id in live_leases(runtime)
    assert bindspace.is_dir()
    assert cmd.is_running() and cli.poll() is None

    assert cli.stdin is not None
    cli.stdin.close()   # CMD reads EOF and exits 0
    assert cli.wait(timeout=DEADLINE) == 0
    wait_for(lambda: not bindspace.exists(), RECLAIM, "the lease to end with its command")
    assert lease_id not in live_leases(runtime)


# -- 8. two daemons at the same moment -----------------------------------------------


def test_two_daemons_started_together_leave_one(runtime: Runtime) -> None:
    argv = [PY, "-m", "tractor_session", "serve", "--root", str(runtime.root), *GRACE]
    for round_ in range(3):
        pair = [
            runtime.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(2)
        ]
        loser = wait_for(lambda: next((p for p in pair if p.poll() is not None), None),
                         what=f"one of two daemons to give up (round {round_})")
        (winner,) = [p for p in pair if p is not loser]
        assert loser.returncode != 0
        assert wait_for(lambda: daemon_serves(runtime), what="the winner to serve") == winner.pid
        assert winner.poll() is None
        assert runtime.daemon_pid() == winner.pid
        holder = blocker(runtime)
        assert lease_json(runtime, holder.pid)["lease_id"] in live_leases(runtime)
        winner.send_signal(signal.SIGTERM)
        assert winner.wait(timeout=DEADLINE) == 0


# -- 9. a clean stop --------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_clean_stop_keeps_live_leases_for_next_daemon(runtime: Runtime, sig: signal.Signals) -> None:
    daemon = runtime.start_daemon(*GRACE)
    holder = blocker(runtime)
    exported = [
        lease_json(runtime, holder.pid),
        lease_json(runtime, holder.pid, "--ttl", "600"),
        lease_json(runtime, holder.pid, "--no-reap", "--tpt-proto", "uds"),
    ]
    cli, _, cli_dir, cli_id = start_lease_cmd(runtime, cmd=[PY, "-c", BLOCK])
    nr_cli, _, nr_dir, nr_id = start_lease_cmd(runtime, "--no-reap", cmd=[PY, "-c", BLOCK])
    ids = {lease["lease_id"] for lease in exported} | {cli_id, nr_id}
    dirs = {Path(lease["bindspace"]) for lease in exported} | {cli_dir, nr_dir}

    daemon.send_signal(sig)
    assert daemon.wait(timeout=DEADLINE) == 0
    assert all(d.is_dir() for d in dirs), "a clean stop removed a live bindspace"
    assert set(runtime.bindspaces()) == dirs

    runtime.start_daemon(*GRACE)
    leases = live_leases(runtime)
    assert set(leases) == ids
    assert {Path(i.bindspace) for i in leases.values()} == dirs
    assert all(d.is_dir() for d in dirs)

    # The re-adopted command leases still end with their commands.
    for proc, bindspace in ((cli, cli_dir), (nr_cli, nr_dir)):
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(timeout=DEADLINE) == 0
        wait_for(lambda: not bindspace.exists(), RECLAIM, "the command's lease to end")


# Notes each SIGINT it gets in argv[1], and keeps running: only SIGKILL ends
# it.  Creates argv[1].ready once its handler is in place.
STUBBORN = r"""
import signal, sys
def noted(*_):
    open(sys.argv[1], "a").write("SIGINT\\n")
signal.signal(signal.SIGINT, noted)
open(sys.argv[1] + ".ready", "w").close()
while True:
    signal.pause()
"""


def test_clean_stop_mid_reap_leaves_the_lease_to_the_next_daemon(runtime: Runtime) -> None:
    """SIGTERM while a dead holder's session is being reaped: the daemon
    stops at once, and the next daemon finishes the job."""
    daemon = runtime.start_daemon("--reap-grace", "600")
    holder = blocker(runtime)
    lease = lease_json(runtime, holder.pid)
    bindspace = Path(lease["bindspace"])
    noted = runtime.base / "sigint"
    stubborn = runtime.popen([PY, "-c", STUBBORN, str(noted)], env=session_env(runtime, lease),
                             start_new_session=True, stdin=subprocess.DEVNULL)
    wait_for(Path(f"{noted}.ready").exists, what="the leftover process to handle SIGINT")
    holder.kill()
    holder.wait()
    wait_for(noted.exists, RECLAIM, "the reaper's SIGINT")   # now inside its 600 s grace

    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=DEADLINE) == 0
    assert bindspace.is_dir() and pid_alive(stubborn.pid)

    runtime.start_daemon(*GRACE)
    wait_for(lambda: not pid_alive(stubborn.pid), RECLAIM, "the next daemon to SIGKILL the leftover")
    wait_for(lambda: not bindspace.exists(), RECLAIM, "the next daemon to end the lease")
    assert lease["lease_id"] not in live_leases(runtime)


# -- 10. reaping is precise ------------------------------------------------------------


def test_reaping_spares_other_sessions_and_other_users(runtime: Runtime) -> None:
    runtime.start_daemon(*GRACE)
    holder_a, holder_b, holder_c = blocker(runtime), blocker(runtime), blocker(runtime)
    lease_a = lease_json(runtime, holder_a.pid)
    lease_b = lease_json(runtime, holder_b.pid)
    lease_c = lease_json(runtime, holder_c.pid, "--no-reap")
    env_a, env_b = session_env(runtime, lease_a), session_env(runtime, lease_b)
    detached = dict(start_new_session=True, stdin=subprocess.DEVNULL)
    left_a = runtime.popen([PY, "-c", SLEEP], env=env_a, **detached)
    left_b = runtime.popen([PY, "-c", SLEEP], env=env_b, **detached)
    left_c = runtime.popen([PY, "-c", SLEEP], env=session_env(runtime, lease_c), **detached)
    foreign = nobody_sleeper(runtime, env=env_a) if IS_ROOT else None
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


# -- 11. `lease -- CMD` that leaves a child behind --------------------------------------

# Spawns a detached, blocking child that inherits the envelope, writes its
# pid to argv[1], and exits at once.
LEAVES_CHILD = r"""
import os, subprocess, sys
child = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(1000)"], start_new_session=True,
    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(child.pid))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
"""


@pytest.mark.parametrize("reap", [True, False], ids=["reap", "no-reap"])
def test_lease_cmd_leftover_child(runtime: Runtime, strays: list[psutil.Process], reap: bool) -> None:
    runtime.start_daemon(*GRACE)
    pidfile = runtime.base / "child.pid"
    flags = () if reap else ("--no-reap",)
    r = runtime.cli("lease", *flags, "--", PY, "-c", LEAVES_CHILD, str(pidfile))
    assert pidfile.exists(), r.stderr
    child_pid = int(pidfile.read_text())
    if pid_alive(child_pid):
        strays.append(psutil.Process(child_pid))
    assert r.returncode == 0, r.stderr
    assert runtime.bindspaces() == []
    summary = [line for line in r.stderr.splitlines() if "reaped" in line]
    if reap:
        assert len(summary) == 1, r.stderr
        assert str(child_pid) in summary[0]
        wait_for(lambda: not pid_alive(child_pid), RECLAIM, "the leftover child to be reaped")
    else:
        assert summary == [], r.stderr
        assert pid_alive(child_pid), "--no-reap: the leftover child must survive"


# -- found while writing these tests ------------------------------------------------------


def test_exhausted_port_pool_refuses_lease_and_keeps_serving(runtime: Runtime) -> None:
    """A full pool (here: of one port, held by a live lease) is a refusal,
    not a crash of the daemon that holds everyone's leases."""
    port = spare_port()
    daemon = runtime.start_daemon(*GRACE, "--port-pool", f"{port}-{port}")
    holder = blocker(runtime)
    first = lease_json(runtime, holder.pid)
    r = runtime.cli("lease", "--json", "--holder-pid", str(holder.pid))
    assert r.returncode != 0
    assert "no free port" in r.stderr
    assert daemon.poll() is None, "the daemon died"
    assert set(live_leases(runtime)) == {first["lease_id"]}
    assert Path(first["bindspace"]).is_dir()


def test_gc_while_no_daemon_runs_spares_live_sessions(runtime: Runtime) -> None:
    """Between a clean stop and the next daemon, the leases live on disk
    only: `gc` (which then works directly) must not take them for garbage."""
    daemon = runtime.start_daemon(*GRACE)
    holder = blocker(runtime)
    lease = lease_json(runtime, holder.pid)
    bindspace = Path(lease["bindspace"])
    inside = runtime.popen([PY, "-c", SLEEP], env=session_env(runtime, lease),
                           start_new_session=True, stdin=subprocess.DEVNULL)
    wait_for(lambda: "_TRACTOR_RT_VARS" in psutil.Process(inside.pid).environ(),
             what="the session's process to run with its envelope")
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=DEADLINE) == 0

    r = runtime.cli("gc", "--grace", "0")
    assert r.returncode == 0, r.stderr
    assert bindspace.is_dir(), f"gc removed a live session: {r.stdout}"
    assert pid_alive(inside.pid), "gc reaped a live session's process"

    runtime.start_daemon(*GRACE)
    assert lease["lease_id"] in live_leases(runtime)


def test_release_from_inside_the_session_spares_the_requester(runtime: Runtime) -> None:
    """The script pattern: a shell leases with --export, runs things, then
    releases its own lease.  The shell and the releasing CLI carry the
    session's envelope, yet the release must not reap them; a leftover
    child of the script is reaped as usual."""
    runtime.start_daemon(*GRACE)
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
