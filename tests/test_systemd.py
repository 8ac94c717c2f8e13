"""Integration tests for running the daemon under systemd (issue 6).

Real daemon processes and real sockets throughout.  The one stand-in is the
manager's side of ``NOTIFY_SOCKET``: a datagram socket bound and read by the
test.  Socket activation is done the way systemd does it: the test listens on
the control socket, the daemon finds it on fd 3 with ``LISTEN_FDS=1`` and a
``LISTEN_PID`` equal to its own pid (set by a small shim that then execs
the daemon, since the pid is only known once the child exists).

Nothing here touches the real ``/run/user`` or home: units are installed
into a temporary ``HOME``, ``systemctl --user`` and ``systemd-analyze --user``
only ever see a temporary ``XDG_RUNTIME_DIR`` and a bus address that leads
nowhere, so no real user manager is reloaded.
"""

from __future__ import annotations

import os
import queue
import re
import select
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import DEADLINE, Runtime, stop, wait_for

import tractor_session
from tractor_session import client, paths, protocol, wire
from tractor_session import systemd_units as systemd

SYSTEMD_VARS = (
    "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET",
    "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM",
)
WATCHDOG_USEC = 200_000  # so pings are due every 0.1 s
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")
PRIORITY = re.compile(r"^<([0-7])>")
TIMEVAL = struct.Struct("@ll")
# Not exported by Python's socket module; 29 is asm-generic's (x86, arm).
SO_TIMESTAMP = getattr(socket, "SO_TIMESTAMP", 29)


# -- helpers -------------------------------------------------------------------


class NotifySocket:
    """The manager's end of ``NOTIFY_SOCKET``: collects sd_notify messages.

    Like systemd, it reads every datagram as soon as it arrives (a thread
    does): a unix datagram queue holds only ``net.unix.max_dgram_qlen``
    (usually 10) messages, and the test must not be what stalls a sender.
    ``pump=False`` leaves them queued instead: a manager that is not
    reading.
    """

    def __init__(self, bind_to: str, env_value: str, pump: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(bind_to)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
        self.env_value = env_value
        self.seen: list[list[str]] = []
        self._inbox: queue.Queue[tuple[float, list[str]]] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if pump:
            self._thread = threading.Thread(target=self._pump, name="notify-pump", daemon=True)
            self._thread.start()

    def _pump(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.05)
            if ready:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(TIMEVAL.size))
                sent = time.time()
                for level, kind, blob in ancillary:
                    if (level, kind) == (socket.SOL_SOCKET, SO_TIMESTAMP):
                        seconds, micros = TIMEVAL.unpack(blob[: TIMEVAL.size])
                        sent = seconds + micros / 1e6
                self._inbox.put((sent, data.decode().split("\n")))

    def receive_timed(self, timeout: float) -> tuple[float, list[str]] | None:
        """(when it was sent, lines) of the next message, or None if none
        came in time.  The time is the kernel's (``SO_TIMESTAMP``, taken as
        the sender queues the datagram), so it does not depend on how
        promptly this process got around to reading it."""
        try:
            arrived, fields = self._inbox.get(timeout=max(timeout, 0))
        except queue.Empty:
            return None
        self.seen.append(fields)
        return arrived, fields

    def receive(self, timeout: float) -> list[str] | None:
        got = self.receive_timed(timeout)
        return None if got is None else got[1]

    def drain(self) -> None:
        while self.receive(0) is not None:
            pass

    def expect(
        self,
        match: Callable[[list[str]], bool],
        what: str,
        proc: subprocess.Popen[bytes] | None = None,
        timeout: float = DEADLINE,
    ) -> list[str]:
        """Wait (with a deadline) for the first message ``match`` accepts."""
        deadline = time.monotonic() + timeout
        while True:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"the daemon exited ({proc.returncode}) before {what}; saw {self.seen}")
            fields = self.receive(min(deadline - time.monotonic(), 0.2))
            if fields is not None and match(fields):
                return fields
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s; saw {self.seen}")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=DEADLINE)
        self.sock.close()


def has(field: str) -> Callable[[list[str]], bool]:
    return lambda fields: field in fields


def status_count(fields: list[str]) -> int | None:
    """The number in a ``STATUS=`` field of a message, if it carries one."""
    for f in fields:
        if f.startswith("STATUS=") and (m := re.search(r"\d+", f)):
            return int(m.group())
    return None


@pytest.fixture
def notify(runtime: Runtime) -> Iterator[NotifySocket]:
    path = runtime.base / "notify.sock"
    sock = NotifySocket(str(path), str(path))
    try:
        yield sock
    finally:
        sock.close()


def listen_at(path: Path) -> socket.socket:
    """What the .socket unit does: a listening unix stream socket at ``path``
    (its directory created 0700, as ``DirectoryMode=0700`` does)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


def daemon_env(runtime: Runtime, **extra: str) -> dict[str, str]:
    """``runtime.env`` without anything systemd-ish the test run may itself
    have inherited (a CI job run as a unit), plus ``extra``."""
    env = {k: v for k, v in runtime.env.items() if k not in SYSTEMD_VARS}
    env.update(extra)
    return env


# What systemd does between fork and exec: put the listening socket on fd 3
# and set LISTEN_PID to the pid that will run the daemon.  A shim that
# execs keeps its pid, so ``os.getpid()`` here is the daemon's pid.  (Not a
# preexec_fn: the notify pump is a thread, and preexec_fn is unsafe then.)
ACTIVATION_SHIM = """\
import os, sys
fd, listen_pid, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
if fd >= 0 and fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
if listen_pid:
    os.environ["LISTEN_PID"] = str(os.getpid()) if listen_pid == "self" else listen_pid
os.execv(argv[0], argv)
"""


def spawn_daemon(
    runtime: Runtime,
    env: dict[str, str],
    log: Path,
    fd3: int | None = None,
    listen_pid: str | None = None,
    args: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    """Start ``tractor-session serve --root <root>`` like systemd would.

    ``fd3``: an fd the daemon gets as fd 3.  ``listen_pid``: ``"self"`` for
    the daemon's own pid, or a literal pid.  stdout and stderr go to ``log``.
    """
    argv = [sys.executable, "-m", "tractor_session", "serve", "--root", str(runtime.root), *args]
    if fd3 is not None or listen_pid is not None:
        fd = -1 if fd3 is None else fd3
        argv = [sys.executable, "-c", ACTIVATION_SHIM, str(fd), listen_pid or "", *argv]
    with open(log, "ab") as out:
        return runtime.popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            pass_fds=() if fd3 is None else (fd3,),
        )


def hello_gets_no_answer(path: Path, timeout: float = 1.0) -> bool:
    """Connect to ``path``, say hello, and report whether nothing answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(protocol.frame(protocol.Hello(wire.PROTOCOL_VERSION, "test")))
        try:
            data = sock.recv(4096)
        except TimeoutError:
            return True
        return False if data else True


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as lists of (key, value), comments dropped."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"key outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


@pytest.fixture
def home() -> Iterator[dict[str, Path]]:
    """A temporary HOME and XDG_RUNTIME_DIR (0700), removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="ts-home-", dir="/tmp"))
    dirs = {"base": base, "home": base / "home", "run": base / "run"}
    dirs["home"].mkdir(mode=0o700)
    dirs["run"].mkdir(mode=0o700)
    try:
        yield dirs
    finally:
        shutil.rmtree(base, ignore_errors=True)


def isolated_env(home: dict[str, Path], **extra: str) -> dict[str, str]:
    """An environment in which ``systemctl --user`` cannot reach any real
    user manager, and nothing points at the real home."""
    env = {
        k: v for k, v in os.environ.items()
        if k not in SYSTEMD_VARS and not k.startswith(("XDG_", "DBUS_", "TRACTOR_SESSION", "_TRACTOR"))
    }
    env["HOME"] = str(home["home"])
    env["XDG_RUNTIME_DIR"] = str(home["run"])
    env["DBUS_SESSION_BUS_ADDRESS"] = f"unix:path={home['run']}/no-bus-here"
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tractor_session", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=DEADLINE,
    )


def install_units(home: dict[str, Path], **extra: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    env = isolated_env(home, **extra)
    done = run_cli("systemd", "install", env=env, cwd=home["home"])
    assert done.returncode == 0, done.stderr
    config = Path(extra["XDG_CONFIG_HOME"]) if "XDG_CONFIG_HOME" in extra else home["home"] / ".config"
    return done, config / "systemd" / "user"


def exec_start(service_text: str) -> list[str]:
    (line,) = values(parse_unit(service_text), "Service", "ExecStart")
    return shlex.split(line)


# -- 1. the units ----------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not on PATH (CI installs systemd for it)")
def test_systemd_analyze_verify_accepts_installed_units(home: dict[str, Path]) -> None:
    _, unit_dir = install_units(home)
    units = [unit_dir / "tractor-session.socket", unit_dir / "tractor-session.service"]
    assert all(u.is_file() for u in units)
    env = isolated_env(home, XDG_CONFIG_HOME=str(home["base"] / "config"), SYSTEMD_LOG_COLOR="0")
    done = subprocess.run(
        ["systemd-analyze", "--user", "verify", "--man=no", *map(str, units)],
        env=env, cwd=home["home"], capture_output=True, text=True, timeout=60,
    )
    said = (done.stdout + done.stderr).strip()
    assert done.returncode == 0, said
    # verify exits 0 on parse warnings ("Unknown key ..., ignoring"): the
    # units are only accepted if it has nothing to say about them at all.
    assert said == "", f"systemd-analyze verify complained:\n{said}"


def test_units_are_owner_only_notify_watchdog_and_keep_the_runtime_root(home: dict[str, Path]) -> None:
    _, unit_dir = install_units(home)
    sock = parse_unit((unit_dir / "tractor-session.socket").read_text())
    service = parse_unit((unit_dir / "tractor-session.service").read_text())

    assert values(sock, "Socket", "ListenStream") == ["%t/tractor-session/control.sock"]
    assert values(sock, "Socket", "SocketMode") == ["0600"]
    assert values(sock, "Socket", "DirectoryMode") == ["0700"]
    # %t is $XDG_RUNTIME_DIR for a user manager: the unit's socket is the
    # one a client looks for by default.
    xdg = str(home["run"])
    assert paths.control_socket({"XDG_RUNTIME_DIR": xdg}) == str(Path(xdg, "tractor-session", "control.sock"))

    assert values(service, "Service", "Type") == ["notify"]
    (watchdog,) = values(service, "Service", "WatchdogSec")
    assert watchdog and not watchdog.startswith("0"), watchdog
    assert values(service, "Service", "Restart") == ["on-failure"]
    # A restart must re-adopt live leases: nothing may wipe the runtime root.
    runtime_dirs = values(service, "Service", "RuntimeDirectory")
    assert not runtime_dirs or values(service, "Service", "RuntimeDirectoryPreserve") == ["yes"]
    assert "tractor-session.socket" in " ".join(values(service, "Unit", "Requires") + values(service, "Unit", "After"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not on PATH")
def test_exec_start_survives_an_interpreter_path_with_a_percent_sign(home: dict[str, Path]) -> None:
    # An installation under a directory with '%' in its name (unusual, legal).
    odd = home["base"] / "py%h dir"
    odd.mkdir()
    (odd / "python").symlink_to(sys.executable)
    unit_dir = home["base"] / "units"
    unit_dir.mkdir()
    for name, text in systemd.unit_texts(systemd.exec_start(str(odd / "python"))).items():
        (unit_dir / name).write_text(text)
    env = isolated_env(home, XDG_CONFIG_HOME=str(home["base"] / "config"), SYSTEMD_LOG_COLOR="0")
    done = subprocess.run(
        ["systemd-analyze", "--user", "verify", "--man=no",
         str(unit_dir / "tractor-session.socket"), str(unit_dir / "tractor-session.service")],
        env=env, cwd=home["home"], capture_output=True, text=True, timeout=60,
    )
    said = (done.stdout + done.stderr).strip()
    assert done.returncode == 0 and said == "", said


# -- 2. socket activation, readiness, watchdog, stopping ---------------------------


def test_socket_activation_serves_leases_reports_readiness_watchdog_and_stopping(
    runtime: Runtime, notify: NotifySocket
) -> None:
    listener = listen_at(runtime.socket)
    try:
        inode = os.lstat(runtime.socket).st_ino
        env = daemon_env(
            runtime, LISTEN_FDS="1", LISTEN_FDNAMES="control",
            NOTIFY_SOCKET=notify.env_value, WATCHDOG_USEC=str(WATCHDOG_USEC),
        )
        log = runtime.base / "daemon.out"
        proc = spawn_daemon(runtime, env, log, fd3=listener.fileno(), listen_pid="self")

        ready = notify.expect(has("READY=1"), "READY=1", proc)
        assert status_count(ready) in (None, 0), ready

        # It serves on the inherited socket: the file systemd bound is the
        # very one clients reach, never unlinked and rebound by the daemon.
        assert os.lstat(runtime.socket).st_ino == inode
        with client.connect(environ=runtime.env, autostart=False) as conn:
            conn.sock.settimeout(DEADLINE)
            assert conn.daemon_pid() == proc.pid
            granted = conn.lease()
            assert Path(granted.lease.bindspace).is_dir()
            notify.expect(lambda f: status_count(f) == 1, "STATUS= with 1 live lease", proc)
        notify.expect(lambda f: status_count(f) == 0, "STATUS= with 0 live leases", proc)

        # The CLI's usual path works too, and no on-demand daemon was started
        # (that one would log to <control>/daemon.log).
        try:
            done = runtime.cli("lease", "--", "true", timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"`lease -- true` hung; daemon log:\n{log.read_text()}") from None
        assert done.returncode == 0, done.stderr
        assert not (runtime.control / "daemon.log").exists()
        assert runtime.daemon_pid() == proc.pid

        # Watchdog pings every WATCHDOG_USEC/2 = 0.1 s: at least 5 in 2 s,
        # and (loosely) not much faster than asked.
        notify.drain()
        deadline = time.monotonic() + 2.0
        pings: list[float] = []
        while len(pings) < 5 and time.monotonic() < deadline:
            got = notify.receive_timed(deadline - time.monotonic())
            if got is not None and "WATCHDOG=1" in got[1]:
                pings.append(got[0])
        assert len(pings) >= 5, f"{len(pings)} watchdog pings in 2 s; saw {notify.seen[-20:]}"
        took = pings[-1] - pings[0]
        assert took >= 0.2, f"5 watchdog pings within {took:.3f} s: far more often than every 0.1 s"

        # SIGTERM: STOPPING=1, exit 0, and the socket file stays for systemd.
        proc.send_signal(signal.SIGTERM)
        notify.expect(has("STOPPING=1"), "STOPPING=1")
        assert proc.wait(timeout=DEADLINE) == 0, log.read_text()
        st = os.lstat(runtime.socket)
        assert stat.S_ISSOCK(st.st_mode) and st.st_ino == inode
        # ... and still accepts connections (queued for the next start).
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(DEADLINE)
            probe.connect(str(runtime.socket))
    finally:
        listener.close()


def test_a_manager_slow_to_read_notifications_does_not_freeze_the_daemon(runtime: Runtime) -> None:
    path = runtime.base / "slow-notify.sock"
    manager = NotifySocket(str(path), str(path), pump=False)  # reads nothing
    try:
        env = daemon_env(runtime, NOTIFY_SOCKET=manager.env_value, WATCHDOG_USEC="20000")
        proc = spawn_daemon(runtime, env, runtime.base / "daemon.out")
        wait_for(runtime.socket.exists, what="the control socket")
        # Pings are due every 10 ms, so within the next second the unread
        # queue fills many times over; the daemon must keep serving anyway.
        with client.connect(environ=runtime.env, autostart=False) as conn:
            conn.sock.settimeout(3.0)
            until = time.monotonic() + 1.0
            while time.monotonic() < until:
                try:
                    conn.status()
                except client.ClientError as err:
                    pytest.fail(f"the daemon stopped answering while the manager did not read: {err}")
        assert proc.poll() is None
    finally:
        manager.close()


def test_abstract_notify_socket_gets_ready_and_stopping(runtime: Runtime) -> None:
    name = f"ts-test-notify-{uuid.uuid4().hex}"
    notify = NotifySocket("\0" + name, "@" + name)
    try:
        proc = spawn_daemon(runtime, daemon_env(runtime, NOTIFY_SOCKET=notify.env_value), runtime.base / "daemon.out")
        notify.expect(has("READY=1"), "READY=1", proc)
        proc.send_signal(signal.SIGTERM)
        notify.expect(has("STOPPING=1"), "STOPPING=1")
        assert proc.wait(timeout=DEADLINE) == 0
    finally:
        notify.close()


# -- 3. LISTEN_PID naming another process ---------------------------------------------


def test_listen_pid_of_another_process_makes_the_daemon_ignore_fd3(
    runtime: Runtime, notify: NotifySocket
) -> None:
    inherited = runtime.base / "inherited.sock"
    listener = listen_at(inherited)
    try:
        env = daemon_env(runtime, LISTEN_FDS="1", LISTEN_FDNAMES="control", NOTIFY_SOCKET=notify.env_value)
        proc = spawn_daemon(runtime, env, runtime.base / "daemon.out", fd3=listener.fileno(), listen_pid="1")
        notify.expect(has("READY=1"), "READY=1", proc)

        # It bound its own socket at the default path and serves there ...
        assert stat.S_ISSOCK(os.lstat(runtime.socket).st_mode)
        with client.connect(environ=runtime.env, autostart=False) as conn:
            conn.sock.settimeout(DEADLINE)
            assert conn.daemon_pid() == proc.pid
            conn.lease()

        # ... and not on fd 3: a hello there goes unanswered, and the
        # connection is still waiting in the backlog for someone to accept.
        assert hello_gets_no_answer(inherited)
        listener.setblocking(False)
        pending, _ = listener.accept()
        pending.close()

        assert stop(proc) == 0
        # Its own socket it cleans up; the inherited one was never its to touch.
        assert not runtime.socket.exists()
        assert stat.S_ISSOCK(os.lstat(inherited).st_mode)
    finally:
        listener.close()


def test_activation_with_a_non_socket_on_fd3_fails_with_a_clear_error(runtime: Runtime) -> None:
    log = runtime.base / "daemon.out"
    with open(os.devnull, "rb") as not_a_socket:
        proc = spawn_daemon(
            runtime, daemon_env(runtime, LISTEN_FDS="1"), log,
            fd3=not_a_socket.fileno(), listen_pid="self",
        )
        assert proc.wait(timeout=DEADLINE) == 1
    said = log.read_text()
    assert "fd 3" in said and "Traceback" not in said, said


def test_activation_with_a_tcp_socket_on_fd3_is_refused(runtime: Runtime) -> None:
    log = runtime.base / "daemon.out"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(1)
        proc = spawn_daemon(runtime, daemon_env(runtime, LISTEN_FDS="1"), log, fd3=tcp.fileno(), listen_pid="self")
        assert proc.wait(timeout=DEADLINE) == 1
    said = log.read_text()
    assert "not a unix stream socket" in said and "Traceback" not in said, said
    assert not runtime.socket.exists()


# -- 4. install / uninstall -------------------------------------------------------------


@pytest.mark.parametrize("config_home", ["unset", "set"])
def test_install_writes_units_that_run_this_installation_and_uninstall_removes_them(
    home: dict[str, Path], config_home: str
) -> None:
    extra = {"XDG_CONFIG_HOME": str(home["base"] / "cfg")} if config_home == "set" else {}
    done, unit_dir = install_units(home, **extra)
    if config_home == "unset":
        assert unit_dir == home["home"] / ".config" / "systemd" / "user"
    socket_unit = unit_dir / "tractor-session.socket"
    service_unit = unit_dir / "tractor-session.service"
    assert socket_unit.is_file() and service_unit.is_file()
    assert sorted(p.name for p in unit_dir.iterdir()) == sorted(systemd.UNIT_NAMES)
    # It says what it did.
    assert str(socket_unit) in done.stdout and str(service_unit) in done.stdout

    argv = exec_start(service_unit.read_text())
    assert argv == [sys.executable, "-m", "tractor_session", "serve"]
    # Run it the way systemd would: cwd /, a bare environment.
    bare = {"PATH": "/usr/bin:/bin", "HOME": str(home["home"]), "XDG_RUNTIME_DIR": str(home["run"])}
    helped = subprocess.run(
        [*argv, "--help"], env=bare, cwd="/", capture_output=True, text=True, timeout=DEADLINE,
    )
    assert helped.returncode == 0, helped.stderr
    assert "--socket" in helped.stdout and "--root" in helped.stdout
    # ... and it is this installation's package, not some other copy.
    where = subprocess.run(
        [argv[0], "-c", "import tractor_session; print(tractor_session.__file__)"],
        env=bare, cwd="/", capture_output=True, text=True, timeout=DEADLINE,
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).resolve() == Path(tractor_session.__file__).resolve()

    gone = run_cli("systemd", "uninstall", env=isolated_env(home, **extra), cwd=home["home"])
    assert gone.returncode == 0, gone.stderr
    assert not socket_unit.exists() and not service_unit.exists()
    assert str(socket_unit) in gone.stdout and str(service_unit) in gone.stdout


@pytest.mark.parametrize("why", ["no user bus", "no systemctl"])
def test_install_without_systemctl_user_writes_units_and_says_how_to_enable(home: dict[str, Path], why: str) -> None:
    extra = {}
    if why == "no systemctl":
        empty = home["base"] / "empty-path"
        empty.mkdir()
        extra["PATH"] = str(empty)
    done, unit_dir = install_units(home, **extra)
    assert (unit_dir / "tractor-session.socket").is_file()
    assert (unit_dir / "tractor-session.service").is_file()
    assert "systemctl --user enable --now tractor-session.socket" in done.stdout
    assert "ran systemctl" not in done.stdout  # it must not claim what it could not do


@pytest.mark.parametrize("why", ["no user bus", "no systemctl"])
def test_install_now_without_systemctl_user_fails_and_says_what_to_do(home: dict[str, Path], why: str) -> None:
    env = isolated_env(home)
    if why == "no systemctl":
        empty = home["base"] / "empty-path"
        empty.mkdir()
        env["PATH"] = str(empty)
    elif shutil.which("systemctl") and subprocess.run(
        ["systemctl", "--user", "daemon-reload"], env=env, capture_output=True
    ).returncode == 0:
        pytest.skip("this machine has a user manager: systemctl --user works")
    done = run_cli("systemd", "install", "--now", env=env, cwd=home["home"])
    assert done.returncode == 1, done
    assert "systemctl --user failed" in done.stderr and "loginctl enable-linger" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    unit_dir = home["home"] / ".config" / "systemd" / "user"
    assert (unit_dir / "tractor-session.socket").is_file()  # written all the same
    assert "enabled and started" not in done.stdout


def test_uninstall_with_nothing_installed_says_so(home: dict[str, Path]) -> None:
    done = run_cli("systemd", "uninstall", env=isolated_env(home), cwd=home["home"])
    assert done.returncode == 0, done.stderr
    assert "nothing to do" in done.stdout


# -- 5. logs fit the journal --------------------------------------------------------


@pytest.mark.parametrize("journal", ["matches stderr", "unset", "names another file"])
def test_daemon_log_format_follows_journal_stream(runtime: Runtime, notify: NotifySocket, journal: str) -> None:
    log = runtime.base / "daemon.err"
    log.touch()
    other = runtime.base / "other"
    other.touch()
    extra = {"NOTIFY_SOCKET": notify.env_value}
    if journal != "unset":
        st = os.stat(log if journal == "matches stderr" else other)
        extra["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    proc = spawn_daemon(runtime, daemon_env(runtime, **extra), log)
    notify.expect(has("READY=1"), "READY=1", proc)
    with client.connect(environ=runtime.env, autostart=False) as conn:
        conn.sock.settimeout(DEADLINE)
        conn.lease()
    notify.expect(lambda f: status_count(f) == 0, "the lease to end", proc)
    assert stop(proc) == 0
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert any("serving" in line for line in lines), lines
    assert any("stopping" in line for line in lines), lines
    if journal == "matches stderr":
        for line in lines:
            assert PRIORITY.match(line), f"no syslog priority prefix: {line!r}"
            assert not TIMESTAMP.match(PRIORITY.sub("", line)), f"a timestamp of our own: {line!r}"
        assert all(PRIORITY.match(line).group(1) == "6" for line in lines if "serving" in line or "stopping" in line)
    else:
        for line in lines:
            assert TIMESTAMP.match(line), f"no timestamp: {line!r}"
            assert not PRIORITY.match(line), line


def hello_as(uid: int, path: Path) -> bytes:
    """Say hello at ``path`` from a forked child running as ``uid``; return
    what came back (or ``b"ERR ..."``).  Needs root."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(DEADLINE)
                sock.connect(str(path))
                try:
                    sock.sendall(protocol.frame(protocol.Hello(wire.PROTOCOL_VERSION, "test")))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # refused before our hello was read; its answer is still there
                os.write(write_fd, sock.recv(4096))
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            os.write(write_fd, f"ERR {err!r}".encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as answer:
            return answer.read()
    finally:
        os.waitpid(pid, 0)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another uid")
def test_daemon_warning_has_priority_4_under_the_journal(runtime: Runtime, notify: NotifySocket) -> None:
    """A real daemon warning: another uid knocking on an activated socket
    that (unlike the unit's) lets it in; the daemon must refuse and warn."""
    public = Path(tempfile.mkdtemp(prefix="ts-pub-", dir="/tmp"))
    try:
        public.chmod(0o711)
        listener = listen_at(public / "control.sock")
        (public / "control.sock").chmod(0o666)
        log = runtime.base / "daemon.err"
        log.touch()
        st = os.stat(log)
        env = daemon_env(
            runtime, LISTEN_FDS="1", LISTEN_FDNAMES="control",
            NOTIFY_SOCKET=notify.env_value, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}",
        )
        try:
            proc = spawn_daemon(runtime, env, log, fd3=listener.fileno(), listen_pid="self")
            notify.expect(has("READY=1"), "READY=1", proc)
            answer = hello_as(65534, public / "control.sock")
            assert b"forbidden" in answer, answer
            wait_for(lambda: "refused a connection" in log.read_text(), what="the refusal to be logged")
            assert stop(proc) == 0
        finally:
            listener.close()
        (warning,) = [line for line in log.read_text().splitlines() if "refused a connection" in line]
        assert warning.startswith("<4>") and "65534" in warning, warning
    finally:
        shutil.rmtree(public, ignore_errors=True)


@pytest.mark.parametrize("journal", [True, False])
def test_warnings_get_priority_4_under_the_journal(tmp_path: Path, journal: bool) -> None:
    """The daemon's own logging set-up, in a real process, for a warning
    (a real daemon warns only on hard-to-provoke events such as another
    uid connecting)."""
    log = tmp_path / "err"
    log.touch()
    env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARS}
    if journal:
        st = os.stat(log)
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    code = (
        "import logging; from tractor_session.daemon import systemd; systemd.configure_logging();"
        "log = logging.getLogger('tractor_session.daemon');"
        "log.info('an info'); log.warning('a warning'); log.error('an error')"
    )
    with open(log, "ab") as err:
        done = subprocess.run([sys.executable, "-c", code], env=env, stderr=err, timeout=DEADLINE)
    assert done.returncode == 0
    lines = log.read_text().splitlines()
    assert len(lines) == 3, lines
    if journal:
        assert lines == ["<6>an info", "<4>a warning", "<3>an error"]
    else:
        assert all(TIMESTAMP.match(line) for line in lines), lines
        assert "WARNING" in lines[1] and "a warning" in lines[1]


def test_the_repository_units_are_the_ones_install_writes() -> None:
    """systemd/ ships the same units `systemd install` writes, with a
    generic interpreter: editing one without the other fails here."""
    repo_units = Path(__file__).resolve().parent.parent / "systemd"
    generic = ["/usr/bin/env", "python3", "-m", "tractor_session", "serve"]
    for name, text in systemd.unit_texts(generic).items():
        assert (repo_units / name).read_text() == text, f"systemd/{name} is out of date"
