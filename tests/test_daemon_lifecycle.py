"""The daemon's own life: ``tractor-session stop`` ends it cleanly and
returns once it is gone (live leases stay, with their bindspaces, and the
daemon the next command starts re-adopts them; with no daemon it says so);
a daemon started on demand exits after its idle time with no lease and no
client connected, and not while either lasts, while one run by hand stays;
a daemon started only for a first request that failed exits at once,
unless someone else already uses it; ``serve -v`` and ``--log-level``
decide whether grants and releases are logged; the log of a daemon that
runs on rotates, stderr following it; ``--version`` shows the client's and
the daemon's version and says what to do when they differ, ``stop``
included for a daemon too old to know the request.

Real daemon processes and real CLI processes, nothing mocked; a daemon of
another version is a real daemon run with its version (and what it
understands) changed.  Every wait is a deadline-bounded ``wait_for``; the
two checks that something does *not* happen for a while (the idle clock
must not run out while the daemon is in use) watch it for a bounded time.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import conftest
import pytest
from conftest import (
    BLOCK,
    CLI,
    DEADLINE,
    QUICK_REAP,
    Runtime,
    assert_served,
    daemon_processes,
    exchange,
    export_lease,
    pid_alive,
    raw_frame,
    start_lease_cmd,
    stop,
    wait_for,
)

import tractor_session
from tractor_session import client, systemd_units
from tractor_session.autostart import IDLE_EXIT_ENV
from tractor_session.daemon.systemd import LOG_ROTATE_BYTES
from tractor_session.paths import short_name

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and flock")

IDLE = 0.5
"""The idle time of the on-demand daemons that are to exit here."""
IN_USE = 4 * IDLE
"""How long a daemon in use is watched for not exiting."""
VERSION = tractor_session.__version__


def lock_free(runtime: Runtime) -> bool:
    """Whether no daemon holds the root's lock (the one-daemon flock)."""
    try:
        fd = os.open(runtime.control / "daemon.lock", os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def never(condition: Callable[[], object], seconds: float, what: str) -> None:
    """Fail if ``condition`` becomes true within ``seconds``."""
    try:
        wait_for(condition, seconds, what)
    except AssertionError:
        return
    raise AssertionError(f"{what} within {seconds} s")


def log_of(runtime: Runtime) -> Path:
    """Where a daemon started on demand logs."""
    return runtime.control / "daemon.log"


def lease_ids(runtime: Runtime) -> set[str]:
    res = runtime.cli("status", "--json")
    assert res.returncode == 0, res.stderr
    return {info["lease_id"] for info in json.loads(res.stdout)}


# -- stop --------------------------------------------------------------------------


def test_stop_ends_the_daemon_and_the_next_one_readopts_its_leases(runtime: Runtime) -> None:
    """`stop` returns once the daemon has let go of its lock and socket, so
    `stop && lease` starts a fresh daemon, which re-adopts both kinds of
    lease: an exported one and a running `lease -- CMD`, whose release at
    CMD's end then reaches the new daemon."""
    daemon = runtime.start_daemon(*QUICK_REAP)
    holder = runtime.holder()
    exported = export_lease(runtime, holder.pid)
    cli, cmd, cmd_bindspace, cmd_lease = start_lease_cmd(runtime, cmd=[sys.executable, "-c", BLOCK])

    second = runtime.holder()
    both = subprocess.run(
        ["sh", "-c", '"$@" stop && "$@" lease --json --holder-pid ' + str(second.pid), "sh", *CLI],
        env=runtime.env, capture_output=True, text=True, timeout=60,
    )
    assert both.returncode == 0, both.stderr
    said, _, lease_json = both.stdout.partition("\n")
    assert said == f"stopped the daemon (pid {daemon.pid}); 2 live leases stay on disk, and the next daemon re-adopts them"
    assert daemon.wait(timeout=DEADLINE) == 0
    assert pid_alive(holder.pid) and cmd.is_running() and cli.poll() is None
    fresh = json.loads(lease_json)
    new_pid = runtime.daemon_pid()
    assert new_pid is not None and new_pid != daemon.pid
    assert lease_ids(runtime) == {exported["lease_id"], cmd_lease, fresh["lease_id"]}
    assert Path(exported["bindspace"]).is_dir() and cmd_bindspace.is_dir()

    assert cli.stdin is not None
    cli.stdin.close()
    assert cli.wait(timeout=DEADLINE) == 0
    assert not cmd_bindspace.exists(), "the new daemon did not release the re-adopted lease"
    assert lease_ids(runtime) == {exported["lease_id"], fresh["lease_id"]}

    res = runtime.cli("stop")
    assert res.returncode == 0, res.stderr
    assert f"stopped the daemon (pid {new_pid}); 2 live leases stay on disk" in res.stdout
    # Gone by the time `stop` returned, not some time later.
    assert lock_free(runtime) and not runtime.socket.exists()
    assert not pid_alive(new_pid)
    assert Path(exported["bindspace"]).is_dir() and Path(fresh["bindspace"]).is_dir()


def test_stop_without_a_daemon_says_so_and_starts_none(runtime: Runtime) -> None:
    res = runtime.cli("stop")
    assert res.returncode == 0, res.stderr
    assert "no daemon runs" in res.stdout
    assert runtime.daemon_pid() is None and not runtime.socket.exists()
    assert daemon_processes(runtime) == []


# -- a lost control socket -------------------------------------------------------------


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_daemon_whose_socket_file_is_lost_serves_the_next_client(runtime: Runtime, how: str) -> None:
    """With its socket's file deleted (or replaced by a dead socket) the
    daemon still holds the lock, so no other can start: the next client
    (`status`, which starts no daemon, or `lease`, which would) asks it to
    bind the socket again and is served by it.  Connections open
    meanwhile, and the leases bound to them, go on."""
    daemon = runtime.start_daemon()
    with runtime.connect() as held:
        lease = held.lease("uds").lease
        runtime.socket.unlink()
        if how == "replaced":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
                dead.bind(str(runtime.socket))
            res = runtime.cli("lease", "--", "true", timeout=DEADLINE)
            assert res.returncode == 0, res.stderr
        assert lease_ids(runtime) == {lease.lease_id}
        assert runtime.daemon_pid() == daemon.pid
        res = runtime.cli("lease", "--", "true", timeout=DEADLINE)
        assert res.returncode == 0, res.stderr
        assert [info.lease_id for info in held.status().leases] == [lease.lease_id]
    wait_for(lambda: lease_ids(runtime) == set(), what="the connection's lease to end with it")
    assert runtime.daemon_pid() == daemon.pid
    assert stop(daemon) == 0
    assert not runtime.socket.exists()


# -- idle exit -----------------------------------------------------------------------


def test_an_on_demand_daemon_exits_when_idle_and_not_before(runtime: Runtime) -> None:
    """Neither a live lease nor an open connection lets the idle clock run
    out; once both are gone the daemon exits, no sooner than its idle
    time.  A daemon run by hand (started first, so idle for longer) stays,
    and the systemd unit does not ask for an idle exit."""
    by_hand = runtime.start_daemon(root=runtime.base / "hand" / "tractor")
    env = {**runtime.env, IDLE_EXIT_ENV: str(IDLE)}
    holder = runtime.holder()
    res = runtime.cli("lease", "--json", "--holder-pid", str(holder.pid), env=env)
    assert res.returncode == 0, res.stderr
    bindspace = Path(json.loads(res.stdout)["bindspace"])
    pid = runtime.daemon_pid()
    assert pid is not None
    never(lambda: not pid_alive(pid), IN_USE, "the daemon exited while a lease lived")

    with client.connect(autostart=False, environ=env) as conn:
        assert conn.daemon_pid() == pid
        holder.kill()
        wait_for(lambda: not bindspace.exists(), what="the lease to end with its holder")
        never(lambda: not pid_alive(pid), IN_USE, "the daemon exited while a client was connected")
        closed = time.monotonic()
    wait_for(lambda: not pid_alive(pid), what="the idle daemon to exit")
    assert time.monotonic() - closed >= IDLE
    assert lock_free(runtime) and not runtime.socket.exists()
    assert f"stopping after {IDLE:g} s idle" in log_of(runtime).read_text()

    assert by_hand.poll() is None, "a daemon run by hand exited when idle"
    assert "--exit-when-idle" not in systemd_units.unit_texts()["tractor-session.service"]
    assert stop(by_hand) == 0


# -- a failed first request ---------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["lease", "--export", "--holder-pid", "1"],
    ["lease", "--parent", "0123abcd", "--", "true"],
], ids=["exported-lease-refused", "lease-cmd-refused"])
def test_a_failed_first_request_leaves_no_daemon(runtime: Runtime, argv: list[str]) -> None:
    res = runtime.cli(*argv)
    assert res.returncode != 0
    assert "holder pid 1" in res.stderr or "0123abcd" in res.stderr, res.stderr
    log = log_of(runtime).read_text()
    assert "serving" in log, "no daemon was started at all"
    wait_for(lambda: daemon_processes(runtime) == [], what="the daemon started for nothing to exit")
    wait_for(lambda: lock_free(runtime), what="its lock to be released")
    assert "stopping at the request of" in log_of(runtime).read_text()
    assert runtime.bindspaces() == []


@pytest.mark.parametrize("in_use", ["another-client-connected", "a-live-lease"])
def test_a_failed_first_request_spares_a_daemon_in_use(runtime: Runtime, in_use: str) -> None:
    """Another client may start using the daemon between its start and the
    first request's failure: then it stays."""
    first = client.connect(environ=runtime.env)
    assert first.spawned
    other = client.connect(autostart=False, environ=runtime.env)
    try:
        pid = other.daemon_pid()  # connected, said hello
        if in_use == "a-live-lease":
            other.close()
            export_lease(runtime, runtime.holder().pid)
        err = conftest.client_error(lambda: first.lease("tcp", holder_pid=1))
        assert err.code == "bad-holder", err
    finally:
        first.close()
    # Still serving, the same daemon, never told to stop.
    with runtime.connect() as again:
        assert again.daemon_pid() == pid
        assert len(again.status().leases) == (1 if in_use == "a-live-lease" else 0)
    other.close()
    assert pid_alive(pid) and "stopping" not in log_of(runtime).read_text()
    assert runtime.cli("stop").returncode == 0


# -- logging ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "traffic", "info"), [
    ([], False, True),
    (["-v"], True, True),
    (["--verbose"], True, True),
    (["--log-level", "debug"], True, True),
    (["--log-level", "warning", "-v"], False, False),
], ids=["default", "-v", "--verbose", "debug", "warning"])
def test_grants_and_releases_are_logged_only_when_asked(
    runtime: Runtime, tmp_path: Path, args: list[str], traffic: bool, info: bool,
) -> None:
    log = tmp_path / "daemon.log"
    daemon = runtime.start_daemon(*args, log=log)
    short = short_name(assert_served(runtime).lease.lease_id)
    assert stop(daemon) == 0
    text = log.read_text()
    assert (f"INFO granted {short} to pid {os.getpid()}" in text) == traffic, text
    assert (f"INFO ended {short} (released)" in text) == traffic, text
    assert ("INFO serving" in text and "INFO stopping on SIGTERM" in text) == info, text


def test_an_on_demand_daemon_rotates_its_log_while_it_runs(runtime: Runtime) -> None:
    """Once the log passes its size, the daemon itself moves it to
    daemon.log.1 and goes on in a new daemon.log (owner-only), its stderr
    with it: no restart, no client needed."""
    res = runtime.cli("lease", "--json", "--holder-pid", str(runtime.holder().pid))
    assert res.returncode == 0, res.stderr
    pid = runtime.daemon_pid()
    assert pid is not None
    log, old = log_of(runtime), log_of(runtime).with_name("daemon.log.1")
    assert os.readlink(f"/proc/{pid}/fd/2") == str(log)
    padding = "padding " * (LOG_ROTATE_BYTES // 8) + "\n"
    with open(log, "a") as grown:
        grown.write(padding)
    assert not old.exists()

    exchange(runtime, raw_frame(b"not a hello"))  # logged at INFO: "dropping a client"
    wait_for(lambda: old.exists(), what="the log to be rotated")
    assert padding in old.read_text() and "serving" in old.read_text()
    wait_for(lambda: "dropping a client" in log.read_text(), what="the next line in the new log")
    assert "padding" not in log.read_text()
    assert log.stat().st_mode & 0o777 == 0o600
    assert os.readlink(f"/proc/{pid}/fd/2") == str(log), "stderr still writes into the old log"
    assert runtime.daemon_pid() == pid

    assert runtime.cli("stop").returncode == 0
    assert "stopping at the request of" in log.read_text()
    assert "stopping" not in old.read_text()


# -- versions ----------------------------------------------------------------------------------

# A real daemon of another version: argv VERSION KNOWS_STOP, then the CLI's.
# An empty VERSION is a daemon older than version reporting; "no-stop" one
# older than the stop request, which it then refuses as malformed.
OTHER_VERSION = r"""
import sys, typing, msgspec, tractor_session
from tractor_session import protocol
tractor_session.__version__ = sys.argv.pop(1)
if sys.argv.pop(1) == "no-stop":
    known = [t for t in typing.get_args(protocol.Request) if t is not protocol.Stop]
    protocol._request_decoder = msgspec.json.Decoder(typing.Union[tuple([protocol.Hello, *known])])
from tractor_session.cli import main
sys.exit(main())
"""


def test_version_shows_the_client_and_the_daemon(runtime: Runtime) -> None:
    res = runtime.cli("--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [f"tractor-session {VERSION}", "daemon: none runs (the next command starts one)"]
    assert runtime.daemon_pid() is None, "--version started a daemon"

    daemon = runtime.start_daemon()
    res = runtime.cli("--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [f"tractor-session {VERSION}", f"daemon {VERSION} (pid {daemon.pid})"]
    assert "differs" not in res.stderr


@pytest.mark.parametrize(("theirs", "knows_stop", "says"), [
    ("0.0.9", "stop", "daemon 0.0.9 (pid {pid})"),
    ("", "no-stop", "daemon (pid {pid}): too old to say its version"),
], ids=["older-daemon", "daemon-older-than-stop"])
def test_a_version_mismatch_is_reported_and_stop_then_lease_brings_this_version(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, theirs: str, knows_stop: str, says: str,
) -> None:
    """What the report says to do works: `stop` (SIGTERM for a daemon that
    does not know the request), then the next command starts a daemon of
    this version, which re-adopts the old one's lease."""
    with monkeypatch.context() as patch:
        patch.setattr(conftest, "CLI", [sys.executable, "-c", OTHER_VERSION, theirs, knows_stop])
        old = runtime.start_daemon()
    kept = export_lease(runtime, runtime.holder().pid)

    res = runtime.cli("--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [f"tractor-session {VERSION}", says.format(pid=old.pid)]
    assert "the daemon's version differs from this client's; run `tractor-session stop`" in res.stderr
    assert "the next command starts a daemon of this version" in res.stderr

    res = runtime.cli("stop")
    assert res.returncode == 0, res.stderr
    assert f"stopped the daemon (pid {old.pid})" in res.stdout
    assert lock_free(runtime)
    assert old.poll() == 0, "stop returned before the daemon's process ended"

    fresh = export_lease(runtime, runtime.holder().pid)  # starts a daemon of this version
    assert lease_ids(runtime) == {kept["lease_id"], fresh["lease_id"]}
    res = runtime.cli("--version")
    assert res.stdout.splitlines()[1].startswith(f"daemon {VERSION} (pid "), res.stdout
    assert "differs" not in res.stderr
    assert Path(kept["bindspace"]).is_dir()
    assert runtime.cli("stop").returncode == 0


def test_a_client_probing_the_lock_does_not_make_a_starting_daemon_quit(runtime: Runtime) -> None:
    """A status/gc probe holds the lock shared for an instant; a daemon
    starting at that moment waits it out instead of refusing to run."""
    import threading

    from tractor_session.daemon.main import acquire_daemon_lock

    runtime.control.mkdir(parents=True, exist_ok=True)
    probe = os.open(runtime.control / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    threading.Timer(0.05, os.close, (probe,)).start()
    fd = acquire_daemon_lock(runtime.control)
    try:
        assert not lock_free(runtime)
    finally:
        os.ftruncate(fd, 0)  # it names this process: teardown must not kill it
        os.close(fd)


def test_status_during_a_gc_without_a_daemon_signals_no_stranger(runtime: Runtime) -> None:
    """A daemonless ``gc`` holds the lock, whose file still names a dead
    daemon's pid, now reused by an unrelated ``... serve``: ``status`` must
    not SIGUSR1 it (that would kill it) and says no daemon runs once gc ends."""
    stranger = runtime.popen([sys.executable, "-c", "import time; time.sleep(60)", "serve"])
    runtime.control.mkdir(parents=True, exist_ok=True)
    gc_lock = os.open(runtime.control / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(gc_lock, fcntl.LOCK_EX)
        os.write(gc_lock, f"{stranger.pid}\n".encode())
        status = subprocess.Popen(
            [*CLI, "status"], env=runtime.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        runtime.procs.append(status)  # type: ignore[arg-type]
        never(lambda: stranger.poll() is not None, 1.0, "the stranger died")
    finally:
        os.close(gc_lock)
    out, err = status.communicate(timeout=30)
    assert stranger.poll() is None
    assert "kill" not in out + err
