"""Shared test infrastructure: a private runtime root per test, real daemon
processes, real holders and leased commands, and deadline-bounded waiting
(never a bare sleep).

Every helper the test files share is defined here, once.  Nothing of ours
is mocked anywhere in the suite: a test starts ``tractor-session serve``
and ``tractor-session`` CLI processes for real, and asserts on outcomes (a
bindspace gone, a process dead, a port bindable, what ``status`` lists).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import psutil
import pytest

from tractor_session import paths
from tractor_session.protocol import Hello, Welcome, decode_reply, frame
from tractor_session.records import BINDSPACE_NAME_RE, RECORD_NAME
from tractor_session.wire import HEADER, PROTOCOL_VERSION

if TYPE_CHECKING:
    from tractor_session import client, protocol
    from tractor_session.envelope import RuntimeVars

DEADLINE = 15.0
# How long a dead session may take to be cleaned up, with QUICK_REAP's
# grace between SIGINT and SIGKILL.
RECLAIM = 10.0
QUICK_REAP = ("--reap-grace", "0.5")
# `python -m tractor_session`: what the installed script runs.
CLI = [sys.executable, "-m", "tractor_session"]
UDS_REGISTRY_NAME = "registry@1616.sock"
NOBODY = 65534  # another user, for the checks that need root
IS_ROOT = os.geteuid() == 0

# Python code for a process that lives until its stdin closes (a holder).
BLOCK = "import sys; sys.stdin.read()"
# Python code for a process that lives until it is signalled; SIGINT ends it
# (KeyboardInterrupt).
SLEEP = "import time; time.sleep(1000)"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("chaos", "the chaos test (tests/test_chaos.py)")
    group.addoption("--chaos-seconds", type=float, default=8.0, help="how long it runs (default: 8)")
    group.addoption("--chaos-seed", type=int, default=None, help="replay a run (its seed is in every failure)")


def needs_root(why: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not IS_ROOT, reason=f"needs root: {why}")


# -- waiting and processes ------------------------------------------------------


def wait_for(condition: Callable[[], object], timeout: float = DEADLINE, what: str = "condition") -> object:
    """Poll ``condition`` until it returns something truthy, or fail."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, ignoring the gone."""
    try:
        proc = psutil.Process(pid)
        family = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return
    for p in family:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(family, timeout=5)


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_if_alive(*pids: int) -> None:
    """SIGKILL processes that are not our children (no waiting on them)."""
    for pid in pids:
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def dead_pid() -> tuple[int, float]:
    """The pid and start time of a process that has really exited."""
    proc = subprocess.Popen(["sleep", "300"])
    start = psutil.Process(proc.pid).create_time()
    proc.kill()
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid, start


def only_child(pid: int) -> psutil.Process | None:
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return None
    return children[0] if len(children) == 1 else None


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM a daemon (a clean stop) and return its exit status."""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=DEADLINE)


# -- ports ----------------------------------------------------------------------


class PortPool(NamedTuple):
    """A window of ports; ``str()`` is the ``--port-pool`` spec."""

    low: int
    high: int

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"


def private_pool(size: int = 200) -> PortPool:
    """A window of ``size`` free ports outside the kernel's ephemeral range
    and away from the default pool (which every other daemon on this host
    starts handing out at its first port), so that concurrent test runs do
    not take or collide on the ports we bind-check."""
    from tractor_session.daemon import ports

    eph = ports.ephemeral_range()
    rng = random.SystemRandom()
    for _ in range(200):
        low = rng.randrange(10000, 20000 - size)
        window = range(low, low + size)
        if (window.stop <= eph.start or window.start >= eph.stop) and all(map(ports.is_free, window)):
            return PortPool(window.start, window.stop - 1)
    pytest.skip(f"no free private port window outside the ephemeral range {eph}")


def port_bindable(
    port: int, host: str = "0.0.0.0", kinds: tuple[int, ...] = (socket.SOCK_STREAM, socket.SOCK_DGRAM),
) -> bool:
    """Whether ``port`` binds right now on ``host``, for every socket kind in
    ``kinds`` (by default TCP and UDP on every IPv4 address: wholly free)."""
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


# -- the runtime root and its daemon -------------------------------------------


@dataclass
class Runtime:
    """A private runtime root (short enough for AF_UNIX paths) and the
    environment that points every client and daemon at it."""

    base: Path
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.base / "tractor"

    @property
    def control(self) -> Path:
        return Path(paths.control_dir(self.root))

    @property
    def socket(self) -> Path:
        return self.control / "control.sock"

    def bindspaces(self) -> list[Path]:
        if not self.root.exists():
            return []
        return sorted(p for p in self.root.iterdir() if BINDSPACE_NAME_RE.fullmatch(p.name))

    def cli(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60, **kw: object,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``tractor-session ARGS`` to completion."""
        return subprocess.run(
            [*CLI, *args],
            env=env or self.env, capture_output=True, text=True, timeout=timeout, **kw,  # type: ignore[arg-type]
        )

    def popen(self, argv: list[str], env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen[bytes]:
        """Start a process that is killed (with its descendants) at teardown."""
        proc = subprocess.Popen(argv, env=env or self.env, **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def holder(self, argv: list[str] | None = None, env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen[bytes]:
        """A long-lived process to name with ``--holder-pid``: it blocks on
        its stdin (a pipe we hold) and dies at teardown.  No envelope unless
        ``env`` has one."""
        return self.popen(argv or [sys.executable, "-c", BLOCK], env=env, stdin=subprocess.PIPE, **kw)

    def start_daemon(
        self, *args: str, root: Path | None = None, log: Path | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``serve --root ROOT ARGS`` and return once it accepts
        connections (within ``DEADLINE``).

        ``root``: another runtime root than this one's.  ``log``: a file for
        the daemon's output (a pipe nobody reads could fill up and block a
        chatty daemon); without it stderr is a pipe, read when the daemon
        fails.  ``preexec_fn``: set the child up before exec (limits)."""
        read_fd, write_fd = os.pipe()
        out = open(log, "ab") if log is not None else None  # noqa: SIM115 - closed below
        try:
            try:
                proc = self.popen(
                    [*CLI, "serve", "--root", str(root or self.root), "--ready-fd", str(write_fd), *args],
                    pass_fds=(write_fd,), stdin=subprocess.DEVNULL,
                    stdout=out, stderr=out if out is not None else subprocess.PIPE,
                    preexec_fn=preexec_fn,
                )
            finally:
                os.close(write_fd)
                if out is not None:
                    out.close()
            ready, _, _ = select.select([read_fd], [], [], DEADLINE)
            if not ready or not os.read(read_fd, 6):
                proc.kill()
                proc.wait(timeout=DEADLINE)
                if log is not None:
                    why = log.read_text()
                else:
                    assert proc.stderr is not None
                    why = proc.stderr.read().decode()
                raise AssertionError(f"the daemon for {root or self.root} did not start (exit {proc.returncode}): {why}")
        finally:
            os.close(read_fd)
        return proc

    def daemon_pid(self) -> int | None:
        try:
            text = (self.control / "daemon.lock").read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() and pid_alive(int(text)) else None

    def connect(self) -> client.Connection:
        """A library client.  autostart=False: a daemon that died must fail
        the test, not be replaced."""
        from tractor_session import client

        return client.connect(autostart=False, environ=self.env)

    def cleanup(self) -> None:
        for proc in self.procs:
            kill_tree(proc.pid)
            proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        if (pid := self.daemon_pid()) is not None:
            kill_tree(pid)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    # /tmp, not pytest's deeper tmp_path: bindspace socket paths must fit
    # AF_UNIX's 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="ts-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRACTOR_SESSION", "_TRACTOR"))}
    env[paths.ROOT_ENV] = str(base / "tractor")
    env["PYTHONUNBUFFERED"] = "1"
    for name in (paths.SOCKET_ENV, "_TRACTOR_RT_VARS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(paths.ROOT_ENV, env[paths.ROOT_ENV])
    rt = Runtime(base, env)
    try:
        yield rt
    finally:
        rt.cleanup()


@pytest.fixture
def pool() -> PortPool:
    return private_pool()


@pytest.fixture
def daemon(runtime: Runtime, pool: PortPool) -> subprocess.Popen[bytes]:
    """A daemon for ``runtime``'s root, handing out ports from a private
    window (so that the ports a test bind-checks are not another run's)."""
    return runtime.start_daemon("--port-pool", str(pool))


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


def stop_autostarted_daemon(runtime: Runtime) -> None:
    """SIGKILL a daemon a client started (not our child, so the teardown's
    kill_tree would sit waiting on its zombie)."""
    if (pid := runtime.daemon_pid()) is not None:
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid), what="the daemon to die")


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


# -- leases, through the CLI and the client library -----------------------------


def status_json(runtime: Runtime, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """``tractor-session status --json``: the live leases."""
    res = runtime.cli("status", "--json", env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def daemon_status(runtime: Runtime) -> protocol.Status:
    """The daemon's status (its pid, root and leases), through the library."""
    with runtime.connect() as conn:
        return conn.status()


def live_leases(runtime: Runtime) -> dict[str, protocol.LeaseInfo]:
    """The daemon's live leases by id (through the library)."""
    with runtime.connect() as conn:
        return {info.lease_id: info for info in conn.status().leases}


def export_lease(runtime: Runtime, holder_pid: int, *args: str) -> dict[str, Any]:
    """``lease --json --holder-pid PID ARGS``: the lease as JSON."""
    res = runtime.cli("lease", "--json", "--holder-pid", str(holder_pid), *args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def lease_env(runtime: Runtime, lease: dict[str, Any]) -> dict[str, str]:
    """``runtime.env`` plus an exported lease's envelope: what a process of
    that session carries."""
    return {**runtime.env, **lease["env"], "TRACTOR_SESSION_ID": lease["lease_id"]}


def read_record(bindspace: Path) -> dict[str, Any] | None:
    """A bindspace's on-disk lease record, or None."""
    try:
        return json.loads((bindspace / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None


def assert_served(runtime: Runtime, transport: protocol.Transport = "uds") -> protocol.Granted:
    """A well-behaved library client: lease, check the bindspace, release."""
    with runtime.connect() as conn:
        granted = conn.lease(transport=transport)
        bindspace = Path(granted.lease.bindspace)
        assert bindspace.parent == runtime.root and bindspace.is_dir()
        assert conn.release(granted.lease.lease_id).lease_id == granted.lease.lease_id
        assert not bindspace.exists()
    return granted


def client_error(fn: Callable[[], object]) -> client.ClientError:
    """The ClientError ``fn()`` raises (failing if it raises none)."""
    from tractor_session.client import ClientError

    with pytest.raises(ClientError) as info:
        fn()
    return info.value


# -- `lease -- CMD` with a command that stays -----------------------------------

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


@dataclasses.dataclass
class Held:
    """A ``tractor-session lease -- CMD`` whose CMD is alive and blocked."""

    cli: subprocess.Popen[bytes]
    pid: int  # the leased command's
    env: dict[str, str]
    bound: list[Any] | None

    @property
    def rtvars(self) -> RuntimeVars:
        from tractor_session.envelope import load_rtvars

        return load_rtvars(self.env)

    @property
    def bindspace(self) -> Path:
        return Path(self.rtvars._bindspace or "")

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


def start_lease_cmd(runtime: Runtime, *lease_args: str, cmd: list[str], stdin: int = subprocess.PIPE,
                    ) -> tuple[subprocess.Popen[bytes], psutil.Process, Path, str]:
    """Start ``tractor-session lease [ARGS] -- CMD`` and wait until CMD runs
    and the lease is bound to CMD's pid (so a restarted daemon can follow
    it).  Returns (cli, cmd process, bindspace, lease id)."""
    before = set(runtime.bindspaces())
    cli = runtime.popen([*CLI, "lease", *lease_args, "--", *cmd], stdin=stdin)
    new = wait_for(lambda: set(runtime.bindspaces()) - before, what="the lease's bindspace")
    (bindspace,) = new  # type: ignore[misc]
    proc = wait_for(lambda: only_child(cli.pid), what="the CLI's command")
    assert isinstance(proc, psutil.Process)
    wait_for(
        lambda: (rec := read_record(bindspace)) is not None and rec["holder_pid"] == proc.pid,
        what="the lease to be bound to the command's pid",
    )
    record = read_record(bindspace)
    assert record is not None
    return cli, proc, bindspace, record["lease_id"]


# -- the control socket, raw ------------------------------------------------------

# A Hello frame, what every conversation starts with.
HELLO = frame(Hello(PROTOCOL_VERSION, "tests"))


def raw_frame(body: bytes) -> bytes:
    """``body`` framed as is (any bytes, valid or not)."""
    return HEADER.pack(len(body)) + body


def raw_connect(path: Path, timeout: float = DEADLINE) -> socket.socket:
    """A plain unix socket connected to ``path``; ``timeout`` bounds every
    operation on it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
    except BaseException:
        sock.close()
        raise
    return sock


def split_frames(data: bytes) -> list[protocol.Reply]:
    """Decode every reply frame in ``data`` (a whole conversation's bytes)."""
    replies = []
    while data:
        assert len(data) >= HEADER.size, f"truncated header in {data!r}"
        (length,) = HEADER.unpack(data[: HEADER.size])
        body = data[HEADER.size : HEADER.size + length]
        assert len(body) == length, f"truncated reply body in {data!r}"
        replies.append(decode_reply(body))
        data = data[HEADER.size + length :]
    return replies


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything the daemon sends until it closes; the socket's timeout is
    the deadline (a timeout means the daemon did not close: a hang)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        except TimeoutError:
            raise AssertionError(f"the daemon neither answered nor closed; got {data!r} so far") from None
        if not chunk:
            return data
        data += chunk


def recv_reply(sock: socket.socket) -> protocol.Reply | None:
    """One reply frame, or None at end of stream."""
    def exact(n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    header = exact(HEADER.size)
    if header is None:
        return None
    (length,) = HEADER.unpack(header)
    body = exact(length)
    assert body is not None, "connection closed mid-reply"
    return decode_reply(body)


def handshake(sock: socket.socket) -> None:
    sock.sendall(HELLO)
    assert isinstance(recv_reply(sock), Welcome)


def exchange(runtime: Runtime, data: bytes, shut_wr: bool = True, timeout: float = DEADLINE) -> list[protocol.Reply]:
    """Send raw bytes; return the replies read until the daemon closes the
    connection (failing if it neither answers nor closes in time)."""
    with raw_connect(runtime.socket, timeout) as sock:
        sock.sendall(data)
        if shut_wr:
            sock.shutdown(socket.SHUT_WR)
        return split_frames(read_to_eof(sock))
