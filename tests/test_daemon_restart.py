"""The daemon goes and comes back: leases outlive a SIGKILLed or cleanly
stopped daemon and are re-adopted by the next one (a ttl keeps running, a
reused holder pid is not taken for the holder, a lease whose holder died
meanwhile is ended, a reap cut short is finished, a ``lease -- CMD``
still ends with its ``lease`` process); records are hostile input (one
that cannot be read is skipped, one that cannot be true is quarantined,
and neither keeps a daemon from serving the rest); exactly one daemon
serves a root, whether two start at once, a second is started by hand, or
fifty clients start one on demand; ``status`` never starts one.

Everything here is real: real daemon processes (``tractor-session serve``),
real holder processes, real SIGKILLs.  We assert on outcomes (a bindspace
gone, a process dead, what ``status`` lists), and we never sleep to
synchronise: :func:`wait_for` polls against a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import (
    BLOCK,
    CLI,
    DEADLINE,
    IS_ROOT,
    QUICK_REAP,
    RECLAIM,
    SLEEP,
    PortPool,
    Runtime,
    daemon_processes,
    daemon_status,
    dead_pid,
    export_lease,
    kill_tree,
    lease_env,
    live_leases,
    pid_alive,
    read_record,
    start_lease_cmd,
    status_json,
    stop_autostarted_daemon,
    wait_for,
)

from tractor_session import paths
from tractor_session.client import ClientError
from tractor_session.records import QUARANTINED_NAME, RECORD_NAME
from tractor_session.run import SESSION_ENDED

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and pidfds")


# -- a SIGKILLed daemon, restarted ---------------------------------------------------

def test_ttl_runs_on_across_a_daemon_sigkill(runtime: Runtime) -> None:
    """A ttl lease that expired while no daemon ran is ended by the next
    daemon; one with time left is re-adopted and still expires."""
    daemon = runtime.start_daemon(*QUICK_REAP)
    holder = runtime.holder()
    lapsed = export_lease(runtime, holder.pid, "--ttl", "1")
    running = export_lease(runtime, holder.pid, "--ttl", "4")
    daemon.kill()
    daemon.wait()
    wait_for(lambda: time.time() > lapsed["expires"], what="the 1 s lease's expiry to pass")
    assert Path(lapsed["bindspace"]).is_dir()

    runtime.start_daemon(*QUICK_REAP)
    assert running["lease_id"] in live_leases(runtime)
    wait_for(lambda: not Path(lapsed["bindspace"]).exists(), RECLAIM, "the lapsed lease to end")
    assert Path(running["bindspace"]).is_dir() or time.time() > running["expires"]
    wait_for(lambda: not Path(running["bindspace"]).exists(), RECLAIM, "the re-adopted ttl lease to expire")
    assert time.time() >= running["expires"] - 0.1
    assert pid_alive(holder.pid)


def test_reused_pid_does_not_keep_lease_alive(runtime: Runtime) -> None:
    daemon = runtime.start_daemon(*QUICK_REAP)
    stranger = runtime.holder()   # plays the process that got the dead holder's pid
    honest = runtime.holder()
    reused = export_lease(runtime, stranger.pid)
    control = export_lease(runtime, honest.pid)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=DEADLINE) == 0

    # Rewrite the record as if the holder that was granted the lease had
    # started earlier: its pid now names a different (live) process.
    bindspace = Path(reused["bindspace"])
    record = read_record(bindspace)
    assert record is not None and record["holder_pid"] == stranger.pid
    # Whatever its unit, no longer this process's.
    plant_record(bindspace, {**record, "holder_start": record["holder_start"] - 1000.0})

    runtime.start_daemon(*QUICK_REAP)
    # The matching holder's lease is re-adopted (recovery runs before the
    # daemon reports ready) ...
    leases = live_leases(runtime)
    assert control["lease_id"] in leases
    assert Path(control["bindspace"]).is_dir()
    # ... the other one is ended, and the stranger left alone.
    wait_for(lambda: not bindspace.exists(), RECLAIM, "the lease of the reused pid to end")
    assert reused["lease_id"] not in live_leases(runtime)
    assert pid_alive(stranger.pid)


def test_daemon_sigkill_with_200_leases_then_restart(runtime: Runtime) -> None:
    daemon = runtime.start_daemon(*QUICK_REAP)
    shared = [runtime.holder() for _ in range(4)]
    doomed = [runtime.holder() for _ in range(20)]
    with runtime.connect() as conn:
        kept = [conn.lease(holder_pid=shared[i % len(shared)].pid) for i in range(180)]
        lost = [conn.lease(holder_pid=p.pid) for p in doomed]
    keep, lose = [g.lease for g in kept], [g.lease for g in lost]
    assert len({i.port for i in keep + lose}) == 200
    # A process of a doomed session and one of a kept session, detached and
    # carrying their envelopes: the restarted daemon must reap the first
    # with its lease and leave the second alone.
    detached = dict(start_new_session=True, stdin=subprocess.DEVNULL)
    orphan = runtime.popen([sys.executable, "-c", SLEEP], env={**runtime.env, **lost[0].env}, **detached)
    survivor = runtime.popen([sys.executable, "-c", SLEEP], env={**runtime.env, **kept[0].env}, **detached)
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

    runtime.start_daemon(*QUICK_REAP)
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
    with runtime.connect() as conn:
        fresh = [conn.lease(holder_pid=shared[0].pid).lease for _ in range(200)]
    fresh_ports = {i.port for i in fresh}
    fresh_dirs = {i.bindspace for i in fresh}
    assert len(fresh_ports) == 200 and len(fresh_dirs) == 200
    assert not fresh_ports & kept_ports
    assert not fresh_dirs & kept_dirs
    assert all(Path(i.bindspace).is_dir() for i in keep)
    assert len(live_leases(runtime)) == 380


def test_lease_cmd_survives_daemon_sigkill(runtime: Runtime) -> None:
    daemon = runtime.start_daemon(*QUICK_REAP)
    cli, cmd, bindspace, lease_id = start_lease_cmd(runtime, cmd=[sys.executable, "-c", BLOCK])
    daemon.kill()
    daemon.wait()

    runtime.start_daemon(*QUICK_REAP)
    assert lease_id in live_leases(runtime)
    assert bindspace.is_dir()
    assert cmd.is_running() and cli.poll() is None

    assert cli.stdin is not None
    cli.stdin.close()   # CMD reads EOF and exits 0
    assert cli.wait(timeout=DEADLINE) == 0
    wait_for(lambda: not bindspace.exists(), RECLAIM, "the lease to end with its command")
    assert lease_id not in live_leases(runtime)


@pytest.mark.parametrize("when", ["after the restart", "while no daemon runs"])
def test_sigkilled_lease_process_ends_its_readopted_session(runtime: Runtime, when: str) -> None:
    """A re-adopted ``lease -- CMD`` ends on the events that ended it
    before the restart: its ``lease`` process SIGKILLed ends the session
    and CMD with it, whether that happens before or after the next daemon
    starts."""
    daemon = runtime.start_daemon(*QUICK_REAP)
    cli, cmd, bindspace, lease_id = start_lease_cmd(runtime, cmd=[sys.executable, "-c", SLEEP])
    daemon.kill()
    daemon.wait()
    if when == "while no daemon runs":
        cli.kill()
        cli.wait()
    runtime.start_daemon(*QUICK_REAP)
    if when == "after the restart":
        assert lease_id in live_leases(runtime)
        cli.kill()
        cli.wait()
    wait_for(lambda: not pid_alive(cmd.pid), RECLAIM, "the session's command to be reaped")
    wait_for(lambda: not bindspace.exists(), RECLAIM, "the session to end with its lease process")
    assert lease_id not in live_leases(runtime)


def test_readopted_lease_cmd_exits_with_its_commands_status(runtime: Runtime) -> None:
    """After a restart, CMD's end still ends the session through ``lease``'s
    release, and ``lease`` exits with CMD's status, not "session ended"."""
    daemon = runtime.start_daemon(*QUICK_REAP)
    cli, _, bindspace, lease_id = start_lease_cmd(
        runtime, cmd=[sys.executable, "-c", "import sys; sys.stdin.read(); sys.exit(7)"],
    )
    daemon.kill()
    daemon.wait()
    runtime.start_daemon(*QUICK_REAP)
    assert lease_id in live_leases(runtime)
    assert cli.stdin is not None
    cli.stdin.close()
    assert cli.wait(timeout=DEADLINE) == 7
    assert not bindspace.exists()
    assert lease_id not in live_leases(runtime)


def test_readopted_private_session_released_elsewhere_lets_lease_say_why(runtime: Runtime) -> None:
    """After a restart too, the ``lease`` process sharing its session's
    private network is not the session's to reap: released by another
    client, the session ends, and ``lease`` lives to say so and exit 124."""
    daemon = runtime.start_daemon(*QUICK_REAP)
    cli, cmd, bindspace, lease_id = start_lease_cmd(runtime, "--net", "private", cmd=[sys.executable, "-c", BLOCK])
    daemon.kill()
    daemon.wait()
    runtime.start_daemon(*QUICK_REAP)
    assert runtime.cli("release", lease_id, timeout=DEADLINE).returncode == 0
    assert cli.wait(timeout=DEADLINE) == SESSION_ENDED
    assert not pid_alive(cmd.pid) and not bindspace.exists()


# -- records are hostile input ----------------------------------------------------------


def plant_record(bindspace: Path, record: dict[str, Any]) -> None:
    """Write ``record`` as ``bindspace``'s lease record (atomically, as the
    daemon does), creating the directory if need be."""
    bindspace.mkdir(mode=0o700, exist_ok=True)
    tmp = bindspace / (RECORD_NAME + ".test.tmp")
    tmp.write_text(json.dumps(record))
    os.chmod(tmp, 0o600)
    os.replace(tmp, bindspace / RECORD_NAME)


def fresh_ids(runtime: Runtime, n: int) -> list[str]:
    """``n`` lease ids whose bindspace names are free in the root (names
    are short: they collide)."""
    ids: dict[str, str] = {}
    while len(ids) < n:
        lease_id = str(uuid.uuid4())
        if not (runtime.root / (name := paths.bindspace_name(lease_id))).exists():
            ids.setdefault(name, lease_id)
    return list(ids.values())


def forge(runtime: Runtime, record: dict[str, Any], lease_id: str | None = None, **changes: Any) -> Path:
    """A bindspace of a lease no daemon granted: ``record`` copied under a
    new id, with ``changes``."""
    lease_id = lease_id or fresh_ids(runtime, 1)[0]
    bindspace = runtime.root / paths.bindspace_name(lease_id)
    bindspace.mkdir(mode=0o700)   # never over another's
    plant_record(bindspace, {**record, "lease_id": lease_id, "bindspace": str(bindspace), **changes})
    return bindspace


@pytest.mark.parametrize("how", [
    "a socket in the record's place",   # no one can open it, root neither
    pytest.param("chmod 000", marks=pytest.mark.skipif(IS_ROOT, reason="chmod does not stop root")),
])
def test_an_unreadable_bindspace_costs_one_entry(runtime: Runtime, how: str) -> None:
    """A bindspace whose record cannot be read keeps no daemon from
    starting: the next one skips it (and leaves it alone: it cannot tell
    whether its lease lives), re-adopts the others, serves, and its gc
    removes what is stale beside it."""
    daemon = runtime.start_daemon(*QUICK_REAP)
    holder = runtime.holder()
    kept = export_lease(runtime, holder.pid)
    unreadable = Path(export_lease(runtime, holder.pid)["bindspace"])
    daemon.kill()
    daemon.wait()
    template = read_record(Path(kept["bindspace"]))
    assert template is not None
    stale = forge(runtime, template, transport="uds", port=None, holder_pid=dead_pid()[0])
    if how == "chmod 000":
        unreadable.chmod(0)
    else:
        (unreadable / RECORD_NAME).unlink()
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(unreadable / RECORD_NAME))
    try:
        runtime.start_daemon(*QUICK_REAP)
        assert set(live_leases(runtime)) == {kept["lease_id"]}
        res = runtime.cli("lease", "--", "true", timeout=DEADLINE)
        assert res.returncode == 0, res.stderr
        res = runtime.cli("gc", "--grace", "0", "--json", timeout=DEADLINE)
        assert res.returncode == 0, res.stderr
        assert not stale.exists()
        assert unreadable.is_dir()
    finally:
        unreadable.chmod(0o700)


def test_impossible_records_are_quarantined_not_adopted(runtime: Runtime) -> None:
    """A tcp lease without a port, a lease that is its own parent, two that
    are each other's: each is set aside (renamed, where gc and people see
    it), never adopted; everyone else is served, and nothing hangs."""
    daemon = runtime.start_daemon(*QUICK_REAP)
    holder = runtime.holder()
    sound = export_lease(runtime, holder.pid)
    portless = export_lease(runtime, holder.pid)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=DEADLINE) == 0

    template = read_record(Path(sound["bindspace"]))
    assert template is not None
    plant_record(Path(portless["bindspace"]), {**template, **read_record(Path(portless["bindspace"])), "port": None})
    uds = {"transport": "uds", "port": None}
    own_id, a_id, b_id, below_id = fresh_ids(runtime, 4)
    bad = [
        Path(portless["bindspace"]),
        forge(runtime, template, own_id, parent=own_id, **uds),
        forge(runtime, template, a_id, parent=b_id, **uds),
        forge(runtime, template, b_id, parent=a_id, **uds),
    ]
    below_the_cycle = forge(runtime, template, below_id, parent=a_id, **uds)

    runtime.start_daemon(*QUICK_REAP)
    assert set(live_leases(runtime)) == {sound["lease_id"]}
    assert [lease["lease_id"] for lease in status_json(runtime)] == [sound["lease_id"]]
    for bindspace in bad:
        assert (bindspace / QUARANTINED_NAME).is_file() and not (bindspace / RECORD_NAME).exists(), bindspace
    # The lease whose parent was set aside ends as if its parent had.
    wait_for(lambda: not below_the_cycle.exists(), RECLAIM, "the orphaned child lease to end")
    res = runtime.cli("release", sound["lease_id"], timeout=DEADLINE)
    assert res.returncode == 0, res.stderr
    # gc judges a quarantined bindspace as one without a record: by its age.
    res = runtime.cli("gc", "--grace", "0", "--json", timeout=DEADLINE)
    assert res.returncode == 0, res.stderr
    removed = {item["path"]: item["reason"] for item in json.loads(res.stdout)}
    assert set(removed) >= {str(b) for b in bad}
    assert all("quarantined" in removed[str(b)] for b in bad)
    assert runtime.bindspaces() == []


def test_a_forged_claim_on_a_live_leases_port_is_quarantined(runtime: Runtime, pool: PortPool) -> None:
    """Two records naming one port: the live lease keeps it, the forgery is
    set aside, and the port is never handed out while the lease lives."""
    two_ports = ("--port-pool", f"{pool.low}-{pool.low + 1}", *QUICK_REAP)
    daemon = runtime.start_daemon(*two_ports)
    holder = runtime.holder()
    real = export_lease(runtime, holder.pid)
    assert real["port"] == pool.low
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=DEADLINE) == 0
    record = read_record(Path(real["bindspace"]))
    assert record is not None
    gone, _ = dead_pid()
    forged = forge(runtime, record, holder_pid=gone, created=record["created"] + 1)

    runtime.start_daemon(*two_ports)
    wait_for(lambda: not (forged / RECORD_NAME).exists(), RECLAIM, "the forged record to be dealt with")
    assert set(live_leases(runtime)) == {real["lease_id"]}
    with runtime.connect() as conn:
        assert conn.lease(holder_pid=holder.pid).lease.port == pool.low + 1
        with pytest.raises(ClientError) as full:
            conn.lease(holder_pid=holder.pid)
    assert full.value.code == "no-free-port"
    assert (forged / QUARANTINED_NAME).is_file()


def test_a_bindspace_named_by_an_earlier_version_is_re_adopted_and_removed(runtime: Runtime) -> None:
    """Versions before the path budget was widened named bindspaces by 12
    hex digits.  A daemon of this version, started over such a lease,
    re-adopts it, serves it by id and removes it at its end."""
    daemon = runtime.start_daemon(*QUICK_REAP)
    holder = runtime.holder()
    lease = export_lease(runtime, holder.pid)
    daemon.kill()
    daemon.wait()
    # Lay it out as an earlier daemon would have.
    current = Path(lease["bindspace"])
    legacy = current.with_name(lease["lease_id"].replace("-", "")[:12])
    os.rename(current, legacy)
    record = read_record(legacy)
    assert record is not None
    record["bindspace"] = str(legacy)
    (legacy / RECORD_NAME).write_text(json.dumps(record))

    runtime.start_daemon(*QUICK_REAP)
    assert live_leases(runtime)[lease["lease_id"]].bindspace == str(legacy)
    released = runtime.cli("release", lease["lease_id"][:8])
    assert released.returncode == 0, released.stderr
    wait_for(lambda: not legacy.exists(), RECLAIM, "the legacy bindspace to be removed")
    assert live_leases(runtime) == {} and pid_alive(holder.pid)


# -- a clean stop -----------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_clean_stop_keeps_live_leases_for_next_daemon(runtime: Runtime, sig: signal.Signals) -> None:
    daemon = runtime.start_daemon(*QUICK_REAP)
    holder = runtime.holder()
    exported = [
        export_lease(runtime, holder.pid),
        export_lease(runtime, holder.pid, "--ttl", "600"),
        export_lease(runtime, holder.pid, "--no-reap", "--tpt-proto", "uds"),
    ]
    cli, _, cli_dir, cli_id = start_lease_cmd(runtime, cmd=[sys.executable, "-c", BLOCK])
    nr_cli, _, nr_dir, nr_id = start_lease_cmd(runtime, "--no-reap", cmd=[sys.executable, "-c", BLOCK])
    ids = {lease["lease_id"] for lease in exported} | {cli_id, nr_id}
    dirs = {Path(lease["bindspace"]) for lease in exported} | {cli_dir, nr_dir}

    daemon.send_signal(sig)
    assert daemon.wait(timeout=DEADLINE) == 0
    assert all(d.is_dir() for d in dirs), "a clean stop removed a live bindspace"
    assert set(runtime.bindspaces()) == dirs

    runtime.start_daemon(*QUICK_REAP)
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
    holder = runtime.holder()
    lease = export_lease(runtime, holder.pid)
    bindspace = Path(lease["bindspace"])
    noted = runtime.base / "sigint"
    stubborn = runtime.popen([sys.executable, "-c", STUBBORN, str(noted)], env=lease_env(runtime, lease),
                             start_new_session=True, stdin=subprocess.DEVNULL)
    wait_for(Path(f"{noted}.ready").exists, what="the leftover process to handle SIGINT")
    holder.kill()
    holder.wait()
    wait_for(noted.exists, RECLAIM, "the reaper's SIGINT")   # now inside its 600 s grace

    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=DEADLINE) == 0
    assert bindspace.is_dir() and pid_alive(stubborn.pid)

    runtime.start_daemon(*QUICK_REAP)
    wait_for(lambda: not pid_alive(stubborn.pid), RECLAIM, "the next daemon to SIGKILL the leftover")
    wait_for(lambda: not bindspace.exists(), RECLAIM, "the next daemon to end the lease")
    assert lease["lease_id"] not in live_leases(runtime)


# -- one daemon per root ----------------------------------------------------------------


def daemon_serves(runtime: Runtime) -> int | None:
    """The pid of the daemon answering on the control socket, if any."""
    try:
        with runtime.connect() as conn:
            return conn.status().daemon_pid
    except ClientError:
        return None


def test_two_daemons_started_together_leave_one(runtime: Runtime) -> None:
    argv = [sys.executable, "-m", "tractor_session", "serve", "--root", str(runtime.root), *QUICK_REAP]
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
        holder = runtime.holder()
        assert export_lease(runtime, holder.pid)["lease_id"] in live_leases(runtime)
        winner.send_signal(signal.SIGTERM)
        assert winner.wait(timeout=DEADLINE) == 0


def test_second_serve_exits_naming_the_running_daemon(runtime: Runtime, daemon) -> None:
    res = runtime.cli("serve", "--root", str(runtime.root), timeout=DEADLINE)
    assert res.returncode != 0
    assert f"pid {daemon.pid}" in res.stderr, res.stderr
    assert pid_alive(daemon.pid)
    assert [p.pid for p in daemon_processes(runtime)] == [daemon.pid]
    assert runtime.cli("lease", "--", "true").returncode == 0


def test_fifty_clients_at_once_start_exactly_one_daemon(runtime: Runtime) -> None:
    assert daemon_processes(runtime) == []
    holder = runtime.holder()
    clients = [
        runtime.popen(
            [*CLI, "lease", "--json", "--holder-pid", str(holder.pid)],
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
    status = daemon_status(runtime)
    assert status.daemon_pid == daemons[0].pid
    assert {i.lease_id for i in status.leases} == {lease["lease_id"] for lease in leases}
    assert {i["lease_id"] for i in status_json(runtime)} == {lease["lease_id"] for lease in leases}

    # The holder's death ends all fifty.
    kill_tree(holder.pid)
    wait_for(lambda: runtime.bindspaces() == [], what="fifty bindspaces to go")
    assert status_json(runtime) == []
    stop_autostarted_daemon(runtime)


def test_status_without_a_daemon_says_so_and_starts_none(runtime: Runtime) -> None:
    """No daemon means no leases, not an error: `status --json | jq` keeps
    working.  Asking about one lease is an error, though."""
    res = runtime.cli("status")
    assert res.returncode == 0, res.stderr
    assert "no daemon runs" in res.stdout
    res = runtime.cli("status", "--json")
    assert (res.returncode, json.loads(res.stdout)) == (0, [])
    res = runtime.cli("status", "3f2a")
    assert res.returncode == 1 and "no tractor-session daemon" in res.stderr, res.stderr
    assert daemon_processes(runtime) == []
