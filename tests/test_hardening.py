"""Attack and hardening tests (issue 8): peer credentials, limits, resource
exhaustion and hostile input, against real daemon processes over real unix
sockets.

Nothing of ours is mocked.  Each daemon logs to a file of its own (so a
chatty daemon can never block on a full stderr pipe), every wait is a
deadline (``wait_for`` or a socket timeout), and every process is killed at
teardown by the ``runtime`` fixture.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import re
import resource
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import DEADLINE, Runtime, kill_tree, pid_alive, wait_for
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tractor_session import client, envelope, protocol
from tractor_session.daemon import ports
from tractor_session.client import ClientError
from tractor_session.protocol import (
    Bind,
    Error,
    GcRequest,
    Granted,
    Hello,
    LeaseRequest,
    Release,
    Renew,
    StatusRequest,
    Welcome,
    decode_reply,
    decode_request,
    frame,
)
from tractor_session.wire import HEADER, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, ProtocolError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc, SO_PEERCRED and tmpfs")

NOBODY = 65534
HEX12_RE = re.compile(r"[0-9a-f]{12}")
HELLO = frame(Hello(PROTOCOL_VERSION, "test_hardening"))
# Python code for a process that just blocks on its stdin.
BLOCK = "import sys; sys.stdin.read()"


# -- helpers ----------------------------------------------------------------


def start_daemon(
    runtime: Runtime, log: Path, *args: str, preexec_fn: Callable[[], None] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``serve`` logging to ``log``; return once it accepts connections.

    Like ``runtime.start_daemon``, but stderr goes to a file (a pipe nobody
    reads could fill up and block a chatty daemon) and the child can be set
    up before exec (resource limits)."""
    read_fd, write_fd = os.pipe()
    try:
        try:
            with open(log, "ab") as out:
                proc = runtime.popen(
                    [sys.executable, "-m", "tractor_session", "serve", "--root", str(runtime.root),
                     "--ready-fd", str(write_fd), *args],
                    pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                    preexec_fn=preexec_fn,
                )
        finally:
            os.close(write_fd)
        ready, _, _ = select.select([read_fd], [], [], DEADLINE)
        if not ready or not os.read(read_fd, 6):
            raise AssertionError(f"daemon did not start (exit {proc.poll()}): {log.read_text()}")
    finally:
        os.close(read_fd)
    return proc


def raw_connect(path: Path, timeout: float = DEADLINE) -> socket.socket:
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
            raise AssertionError(f"the daemon kept the connection open; got {data!r} so far") from None
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


def assert_one_exchange(replies: list[protocol.Reply]) -> None:
    """The replies to a pipelined Hello + one request: the Welcome and the
    reply, or a lone Error when the daemon gave up before welcoming (it
    sends the Welcome together with the first reply)."""
    assert replies, "the daemon hung up without a word"
    if isinstance(replies[0], Welcome):
        assert len(replies) <= 2 and not any(isinstance(r, Welcome) for r in replies[1:]), replies
    else:
        assert len(replies) == 1 and isinstance(replies[0], Error), replies


def handshake(sock: socket.socket) -> None:
    sock.sendall(HELLO)
    assert isinstance(recv_reply(sock), Welcome)


def connect(runtime: Runtime) -> client.Connection:
    # autostart=False: a daemon that died must fail the test, not be replaced.
    return client.connect(autostart=False, environ=runtime.env)


def assert_served(runtime: Runtime, transport: protocol.Transport = "uds") -> Granted:
    """A well-behaved client: lease, check the bindspace, release."""
    with connect(runtime) as conn:
        granted = conn.lease(transport=transport)
        bindspace = Path(granted.lease.bindspace)
        assert bindspace.parent == runtime.root and bindspace.is_dir()
        assert conn.release(granted.lease.lease_id).lease_id == granted.lease.lease_id
        assert not bindspace.exists()
    return granted


def client_error(fn: Callable[[], object]) -> ClientError:
    with pytest.raises(ClientError) as info:
        fn()
    return info.value


def private_pool(size: int) -> tuple[int, int]:
    """A window of ``size`` free ports outside the ephemeral range and away
    from the default pool (where other daemons on this host start), so that
    concurrent test runs do not take our ports."""
    eph = ports.ephemeral_range()
    rng = random.SystemRandom()
    for _ in range(200):
        low = rng.randrange(10000, 20000 - size)
        window = range(low, low + size)
        if (window.stop <= eph.start or window.start >= eph.stop) and all(map(ports.is_free, window)):
            return window.start, window.stop - 1
    pytest.skip(f"no free private port window outside the ephemeral range {eph}")


def tree_snapshot(top: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Every entry under ``top`` (not following links): mode, mtime, content."""
    snap: dict[str, tuple[int, int, bytes | None]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            st_ = os.lstat(path)
            content = path.read_bytes() if stat.S_ISREG(st_.st_mode) else None
            snap[str(path.relative_to(top))] = (st_.st_mode, st_.st_mtime_ns, content)
    return snap


def assert_root_clean(runtime: Runtime) -> None:
    """The runtime root holds nothing but bindspace directories."""
    for entry in os.scandir(runtime.root):
        assert HEX12_RE.fullmatch(entry.name), f"stray entry in the runtime root: {entry.name!r}"
        assert entry.is_dir(follow_symlinks=False), f"{entry.name} is not a plain directory"


@pytest.fixture
def blocker(runtime: Runtime) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start processes that block on their stdin (holders); their pipes are
    closed at teardown, and ``runtime`` kills whatever is left."""
    started: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str] | None = None, **kw: Any) -> subprocess.Popen[bytes]:
        proc = runtime.popen(argv or [sys.executable, "-c", BLOCK], stdin=subprocess.PIPE, **kw)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            assert proc.stdin is not None
            proc.stdin.close()


def as_nobody() -> dict[str, Any]:
    """Popen keywords that run the child as uid/gid 65534, no extra groups."""
    return {"user": NOBODY, "group": NOBODY, "extra_groups": [], "cwd": "/"}


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching uid and mounting a tmpfs need root")


# -- 1. peer credentials -----------------------------------------------------

def run_as_other_uid(fn: Callable[[], dict[str, Any]], timeout: float = DEADLINE) -> dict[str, Any]:
    """Run ``fn`` in a forked child that switched to uid/gid 65534 (no
    supplementary groups) and return what it returns (JSON-able).

    A fork rather than a new interpreter: this venv's python may live
    where uid 65534 cannot read it."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = json.dumps(fn()).encode()
            while out:
                out = out[os.write(write_fd, out):]
            code = 0
        except BaseException as err:  # noqa: BLE001 - report anything
            with contextlib.suppress(BaseException):
                os.write(write_fd, json.dumps({"error": repr(err)}).encode())
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        data = b""
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError("the other-uid child did not finish in time")
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            data += chunk
        result = json.loads(data or b"{}")
        assert "error" not in result, result["error"]
        return result
    finally:
        os.close(read_fd)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@needs_root
def test_peer_of_another_uid_is_refused_even_with_loosened_permissions(runtime: Runtime, tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    start_daemon(runtime, log)
    # Loosen by hand what is owner-only by design: traverse the dirs, write
    # the socket.  The uid check must hold on its own.
    os.chmod(runtime.base, 0o711)
    os.chmod(runtime.control, 0o711)
    os.chmod(runtime.socket, 0o666)
    before = os.listdir(runtime.root)

    payload = HELLO + frame(LeaseRequest("uds")) + frame(LeaseRequest("tcp", holder_pid=os.getpid()))

    def other_uid_client() -> dict[str, Any]:
        with raw_connect(runtime.socket, timeout=10) as sock:
            with contextlib.suppress(OSError):
                sock.sendall(payload)
            return {"uid": os.getuid(), "data": read_to_eof(sock).hex()}

    out = run_as_other_uid(other_uid_client)
    assert out["uid"] == NOBODY
    replies = split_frames(bytes.fromhex(out["data"]))
    # Refused with a clear error (or simply hung up on), never served.
    assert len(replies) <= 1, replies
    if replies:
        (reply,) = replies
        assert isinstance(reply, Error) and reply.code == "forbidden", reply
    assert os.listdir(runtime.root) == before, "a refused peer must not get a bindspace"

    wait_for(lambda: re.search(rf"refus\w*.*\buid {NOBODY}\b", log.read_text()),
             what="the daemon's log line about the refused uid")
    assert_served(runtime)


@needs_root
def test_holder_pid_of_another_user_is_refused(
    runtime: Runtime, tmp_path: Path, blocker: Callable[..., subprocess.Popen[bytes]]
) -> None:
    start_daemon(runtime, tmp_path / "daemon.log")
    # cat blocks on its stdin; any program uid 65534 may run will do.
    stranger = blocker(["cat"], **as_nobody())
    assert pid_alive(stranger.pid)
    with connect(runtime) as conn:
        err = client_error(lambda: conn.lease("uds", holder_pid=stranger.pid))
        assert err.code == "bad-holder", err
        assert str(stranger.pid) in str(err) and str(NOBODY) in str(err), err
        assert runtime.bindspaces() == []
        # Nor can an existing lease be moved onto the stranger.
        granted = conn.lease("uds")
        err = client_error(lambda: conn.bind(granted.lease.lease_id, stranger.pid))
        assert err.code == "bad-holder", err
        # Our own pid is fine, and the lease still works after the refusal.
        conn.bind(granted.lease.lease_id, os.getpid())
        conn.release(granted.lease.lease_id)
    assert runtime.bindspaces() == []
    assert_served(runtime)


# -- 2. limits -----------------------------------------------------------------


def test_oversized_message_is_refused_while_others_are_served(runtime: Runtime, tmp_path: Path) -> None:
    start_daemon(runtime, tmp_path / "daemon.log", "--max-message-bytes", "1024")
    with connect(runtime) as good:
        held = good.lease("uds")
        # Announced before the Hello.
        with raw_connect(runtime.socket) as bad:
            bad.sendall(HEADER.pack(2048))
            replies = split_frames(read_to_eof(bad))
        assert len(replies) <= 1
        if replies:
            assert isinstance(replies[0], Error) and replies[0].code == "protocol", replies
            assert "2048" in replies[0].message and "1024" in replies[0].message, replies[0]
        # After a valid Hello, with the whole oversized body sent.
        with raw_connect(runtime.socket) as bad:
            handshake(bad)
            body = msgspec.json.encode({"type": "hello", "version": 1, "client": "x" * 2000})
            assert len(body) > 1024
            with contextlib.suppress(OSError):
                bad.sendall(HEADER.pack(len(body)) + body)
            replies = split_frames(read_to_eof(bad))
        assert len(replies) <= 1
        if replies:
            assert isinstance(replies[0], Error) and replies[0].code == "protocol", replies
            assert "1024" in replies[0].message, replies[0]
        # A message just under the limit is fine.
        with raw_connect(runtime.socket) as ok:
            hello = frame(Hello(PROTOCOL_VERSION, "y" * 900))
            assert len(hello) - HEADER.size <= 1024
            ok.sendall(hello)
            assert isinstance(recv_reply(ok), Welcome)
        assert_served(runtime)
        good.release(held.lease.lease_id)
    assert runtime.bindspaces() == []


def test_slow_and_silent_clients_are_disconnected_while_others_are_served(runtime: Runtime, tmp_path: Path) -> None:
    start_daemon(runtime, tmp_path / "daemon.log", "--request-timeout", "0.5")
    payload = HELLO
    sent = 0
    started = threading.Event()
    stop = threading.Event()

    def trickle(sock: socket.socket) -> None:
        # Pacing a trickle is what this thread is for; the test itself waits
        # on events and socket timeouts.
        nonlocal sent
        try:
            for i in range(len(payload)):
                sock.send(payload[i : i + 1])
                sent += 1
                if sent == 3:
                    started.set()
                if stop.wait(0.1):
                    return
        except OSError:
            return
        finally:
            started.set()

    with raw_connect(runtime.socket) as silent, raw_connect(runtime.socket) as slow:
        t0 = time.monotonic()
        thread = threading.Thread(target=trickle, args=(slow,), daemon=True)
        thread.start()
        try:
            assert started.wait(DEADLINE)
            # Both bad clients are connected and not done: others get served.
            for _ in range(3):
                assert_served(runtime)
            slow_replies = split_frames(read_to_eof(slow))
            silent_replies = split_frames(read_to_eof(silent))
            elapsed = time.monotonic() - t0
        finally:
            stop.set()
            thread.join(DEADLINE)
    assert sent < len(payload), "the trickle finished before the daemon cut it off"
    assert elapsed < 3.0, f"disconnecting took {elapsed:.1f} s for a 0.5 s limit"
    for replies, words in ((slow_replies, "incomplete request"), (silent_replies, "no request")):
        assert len(replies) <= 1, replies
        if replies:
            assert isinstance(replies[0], Error) and replies[0].code == "protocol", replies
            assert words in replies[0].message and "0.5" in replies[0].message, replies[0]
    assert_served(runtime)


def test_connection_limit_gives_busy_while_others_are_served(runtime: Runtime, tmp_path: Path) -> None:
    start_daemon(runtime, tmp_path / "daemon.log", "--max-connections", "4")
    idle = [raw_connect(runtime.socket) for _ in range(3)]
    try:
        for sock in idle:
            handshake(sock)  # now surely counted by the daemon
        with connect(runtime) as good:  # the 4th
            held = good.lease("uds")
            with raw_connect(runtime.socket) as fifth:
                replies = split_frames(read_to_eof(fifth))
            assert len(replies) == 1 and isinstance(replies[0], Error), replies
            assert replies[0].code == "busy" and "4 connections" in replies[0].message, replies[0]
            # The connections inside the limit still work.
            assert good.status().leases[0].lease_id == held.lease.lease_id
            good.release(held.lease.lease_id)
    finally:
        for sock in idle:
            sock.close()

    def served() -> bool:
        try:
            assert_served(runtime)
        except ClientError as err:
            if err.code == "busy":
                return False
            raise
        return True

    wait_for(served, what="the daemon to serve again once the idle connections closed")


def test_lease_limit_gives_too_many_leases(runtime: Runtime, tmp_path: Path) -> None:
    start_daemon(runtime, tmp_path / "daemon.log", "--max-leases", "3")
    with connect(runtime) as greedy, connect(runtime) as good:
        held = [greedy.lease("uds").lease.lease_id for _ in range(3)]
        err = client_error(lambda: greedy.lease("uds"))
        assert err.code == "too-many-leases", err
        assert "3 leases" in str(err) and "--max-leases" in str(err), err
        assert len(runtime.bindspaces()) == 3
        # Others are still served (status), and a freed slot is usable.
        assert sorted(lease.lease_id for lease in good.status().leases) == sorted(held)
        greedy.release(held.pop())
        assert_served(runtime)
    # The greedy connection closed: its connection-held leases end.
    wait_for(lambda: runtime.bindspaces() == [], what="connection-held leases to end")
    assert_served(runtime)


def test_empty_port_pool_gives_a_clear_error(runtime: Runtime, tmp_path: Path) -> None:
    low, high = private_pool(2)
    log = tmp_path / "daemon.log"
    daemon = start_daemon(runtime, log, "--port-pool", f"{low}-{high}")
    with connect(runtime) as greedy:
        first, second = (greedy.lease("tcp").lease for _ in range(2))
        assert {first.port, second.port} == {low, high}
        err = client_error(lambda: greedy.lease("tcp"))
        assert daemon.poll() is None, f"the daemon died: {log.read_text()[-2000:]}"
        assert err.code == "no-free-port", err
        assert f"no free port in {low}-{high}" in str(err), err
        assert "2 leases hold ports" in str(err), err
        assert len(runtime.bindspaces()) == 2, "the failed grant left a bindspace behind"
        # A well-behaved uds client is served meanwhile.
        assert_served(runtime, "uds")
        greedy.release(first.lease_id)
        assert assert_served(runtime, "tcp").lease.port == first.port


# -- 3. resource exhaustion ------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(runtime: Runtime, size: str, nr_inodes: int) -> Iterator[Path]:
    """Mount a small tmpfs over the runtime's base (so the root and the
    control dir live on it); kill every process, then unmount, at the end."""
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},nr_inodes={nr_inodes},mode=0700", "tmpfs", str(runtime.base)],
        capture_output=True, text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here, so no full filesystem to test with: {res.stderr.strip()}")
    try:
        yield runtime.base
    finally:
        for proc in runtime.procs:
            kill_tree(proc.pid)
            proc.wait()
        if (pid := runtime.daemon_pid()) is not None:
            kill_tree(pid)
        if subprocess.run(["umount", str(runtime.base)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(runtime.base)], capture_output=True)


def fill_space(path: Path) -> None:
    """Write ``path`` until the filesystem has not one byte left."""
    with open(path, "wb", buffering=0) as f:
        for chunk in (b"\xff" * 65536, b"\xff" * 512, b"\xff"):
            try:
                while f.write(chunk):
                    pass
            except OSError as err:
                assert err.errno == errno.ENOSPC, err


def fill_inodes(path: Path) -> None:
    path.mkdir()
    for i in range(100000):
        try:
            (path / str(i)).touch()
        except OSError as err:
            assert err.errno == errno.ENOSPC, err
            return
    raise AssertionError("the inodes never ran out")


@needs_root
@pytest.mark.parametrize("resource_", ["space", "inodes"])
def test_full_filesystem_fails_cleanly_and_recovers(runtime: Runtime, tmp_path: Path, resource_: str) -> None:
    port, _ = private_pool(1)
    size, inodes = ("2m", 1000) if resource_ == "space" else ("8m", 64)
    with small_tmpfs(runtime, size, inodes) as mnt:
        daemon = start_daemon(runtime, tmp_path / "daemon.log", "--port-pool", f"{port}-{port}")
        assert assert_served(runtime, "tcp").lease.port == port
        filler = mnt / "filler"
        fill_space(filler) if resource_ == "space" else fill_inodes(filler)

        with connect(runtime) as conn:
            for transport in ("tcp", "uds", "tcp"):
                err = client_error(lambda: conn.lease(transport))
                assert err.code == "os-error", err
                assert "full" in str(err) and str(runtime.root) in str(err), err
                # Nothing half-made: no directory, no leftover record.
                assert os.listdir(runtime.root) == []
            assert daemon.poll() is None
            assert conn.status().leases == []

        # Space back: leases work again, and the single pool port was given
        # back each time (a leaked reservation would leave no port at all).
        if resource_ == "space":
            filler.unlink()
        else:
            for f in filler.iterdir():
                f.unlink()
        for _ in range(2):
            assert assert_served(runtime, "tcp").lease.port == port
        assert_served(runtime, "uds")
        assert os.listdir(runtime.root) == []


def test_daemon_raises_its_open_file_soft_limit(runtime: Runtime, tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard // 2)
    if hard == resource.RLIM_INFINITY or low < 32:
        pytest.skip(f"the hard open-file limit ({hard}) leaves no room for the test")

    def lower_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    daemon = start_daemon(runtime, tmp_path / "daemon.log", preexec_fn=lower_soft_limit)
    text = Path(f"/proc/{daemon.pid}/limits").read_text()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("Max open files")]
    got_soft, got_hard = (int(x) for x in line.split()[3:5])
    assert (got_soft, got_hard) == (hard, hard), line


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Starved:
    daemon: subprocess.Popen[bytes]
    log: Path
    conns: list[socket.socket]
    limit: int


@pytest.fixture
def starve(runtime: Runtime, tmp_path: Path) -> Iterator[Callable[..., Starved]]:
    """Start a daemon under a hard 64-fd limit, then open client connections
    (each past its Welcome, so accepted) until it has no fd left."""
    conns: list[socket.socket] = []

    def make(gc_interval: str = "3600") -> Starved:
        limit = 64

        def low_fd_limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        # A dead socket in the root: the start-up sweep removes it and says
        # so, which tells when that sweep (and its transient fds) is over.
        runtime.root.mkdir(mode=0o700)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
            dead.bind(str(runtime.root / "registry@1616.sock"))
        log = tmp_path / "daemon.log"
        daemon = start_daemon(runtime, log, "--gc-interval", gc_interval, preexec_fn=low_fd_limit)
        wait_for(lambda: "gc sweep removed" in log.read_text(), what="the start-up sweep to end")

        def transient() -> list[str]:
            fd_dir = f"/proc/{daemon.pid}/fd"
            targets = []
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(FileNotFoundError):
                    targets.append(os.readlink(f"{fd_dir}/{fd}"))
            return [t for t in targets if t == "/proc" or t.startswith(("/proc/", f"{runtime.root}{os.sep}"))]

        def starved() -> bool:
            for _ in range(limit - open_fds(daemon.pid)):
                conns.append(raw_connect(runtime.socket))
                handshake(conns[-1])  # accepted, so it holds a daemon fd
            return open_fds(daemon.pid) == limit and not transient()

        wait_for(starved, what="the daemon to run out of fds")
        assert len(conns) > 2
        return Starved(daemon, log, conns, limit)

    try:
        yield make
    finally:
        for sock in conns:
            sock.close()


def test_out_of_file_descriptors_gives_a_clear_error_and_recovers(
    runtime: Runtime, starve: Callable[..., Starved]
) -> None:
    st_ = starve()
    daemon, conns, limit = st_.daemon, st_.conns, st_.limit
    sock = conns[0]
    for _ in range(2):
        sock.sendall(frame(LeaseRequest("uds")))
        reply = recv_reply(sock)
        assert isinstance(reply, Error) and reply.code == "os-error", reply
        assert "file descriptors" in reply.message, reply
    assert daemon.poll() is None
    # Recovery: fds back, leases work again.
    for extra in conns[1:]:
        extra.close()
    wait_for(lambda: open_fds(daemon.pid) < limit - 5, what="the daemon to close the connections")
    sock.sendall(frame(LeaseRequest("uds")))
    assert isinstance(recv_reply(sock), Granted)
    assert_served(runtime, "tcp")


def test_out_of_file_descriptors_failed_grant_leaves_nothing(
    runtime: Runtime, starve: Callable[..., Starved]
) -> None:
    conns = starve().conns
    conns[0].sendall(frame(LeaseRequest("uds")))
    reply = recv_reply(conns[0])
    assert isinstance(reply, Error) and reply.code == "os-error", reply
    assert os.listdir(runtime.root) == [], "a failed grant left its directory behind"


def test_out_of_file_descriptors_holder_lease_fails_with_a_clear_error(
    runtime: Runtime, starve: Callable[..., Starved], blocker: Callable[..., subprocess.Popen[bytes]]
) -> None:
    st_ = starve()
    daemon, conns = st_.daemon, st_.conns
    holder = blocker()
    sock = conns[0]
    sock.sendall(frame(LeaseRequest("uds", holder_pid=holder.pid)))
    reply = recv_reply(sock)
    assert daemon.poll() is None
    assert runtime.bindspaces() == []
    assert isinstance(reply, Error) and reply.code == "os-error", reply
    assert "file descriptors" in reply.message, reply


def test_out_of_file_descriptors_never_ends_a_live_lease(
    runtime: Runtime, starve: Callable[..., Starved], blocker: Callable[..., subprocess.Popen[bytes]]
) -> None:
    st_ = starve()
    daemon, conns, limit = st_.daemon, st_.conns, st_.limit
    holder = blocker()
    sock = conns[0]
    # Exactly one fd free: enough for every transient open of a grant.
    conns.pop().close()
    wait_for(lambda: open_fds(daemon.pid) == limit - 1, what="the daemon to close one connection")
    sock.sendall(frame(LeaseRequest("uds", holder_pid=holder.pid)))
    reply = recv_reply(sock)
    assert isinstance(reply, Granted), reply
    lease_id = reply.lease.lease_id
    # Round trips give the daemon's watch task every chance to run; the
    # holder lives, so the lease must stay.
    for _ in range(20):
        sock.sendall(frame(StatusRequest()))
        status = recv_reply(sock)
        assert isinstance(status, protocol.Status)
        assert lease_id in {lease.lease_id for lease in status.leases}, "a live holder's lease was ended"
    assert Path(reply.lease.bindspace).is_dir()


def test_out_of_file_descriptors_periodic_sweep_does_not_kill_the_daemon(
    runtime: Runtime, starve: Callable[..., Starved]
) -> None:
    st_ = starve(gc_interval="0.3")
    # The next sweep runs out of fds: the daemon must say so and live on.
    wait_for(lambda: st_.daemon.poll() is not None
             or re.search(r"sweep(?! removed)", st_.log.read_text(), re.IGNORECASE),
             what="a sweep to run out of fds")
    assert st_.daemon.poll() is None, f"the daemon died: {st_.log.read_text()[-1500:]}"
    for sock in st_.conns[1:]:
        sock.close()
    wait_for(lambda: open_fds(st_.daemon.pid) < st_.limit - 5, what="the daemon to close the connections")
    assert_served(runtime)


# -- 4. hostile input ----------------------------------------------------------

# scripts/fuzz.py raises these for a longer run than CI's.
FUZZ_EXAMPLES = int(os.environ.get("TRACTOR_SESSION_FUZZ_EXAMPLES", "2000"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None)

EVIL_STRINGS = [
    "", "/", "..", ".", "../../x", "/etc", "/etc/passwd", "\x00", "a\x00b", "a" * 10000,
    "../sentinel", "../sentinel/a", "../../tmp", "0" * 12 + "/..", "aaaaaaaaaaaa\n",
    " aaaaaaaaaaaa", "AAAAAAAAAAAA", "aaaaaaaaaaa", "aaaaaaaaaaaaa", "é" * 12, "tractor",
    "../tractor-session/control.sock", str(uuid.uuid4()).upper(), str(uuid.uuid1()),
    "tcp", "uds", "TCP", "hello", "lease",
]
EVIL_VALUES: list[Any] = [
    None, True, False, 0, 1, -1, -(2**31), 2**31, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 2**70,
    0.0, -0.0, 1.5, 1e-300, 1e308, math.nan, math.inf, -math.inf, float(2**70),
    *EVIL_STRINGS, [], [1, 2], {}, {"a": 1}, {"type": "hello"}, b"\x00bytes", [[[[[]]]]],
]
VALID_REQUESTS: list[dict[str, Any]] = [
    {"type": "hello", "version": 1, "client": "x"},
    {"type": "lease", "transport": "uds", "holder_pid": None, "ttl": None, "reap": True,
     "set_xdg": True, "parent": None},
    {"type": "lease", "transport": "tcp", "ttl": 30.0},
    {"type": "release", "lease_id": "0123456789ab"},
    {"type": "renew", "lease_id": str(uuid.uuid4()), "ttl": 5.0},
    {"type": "bind", "lease_id": str(uuid.uuid4()), "pid": 1234},
    {"type": "status"},
    {"type": "gc", "dry_run": True, "grace": None},
]
FIELDS = sorted({key for d in VALID_REQUESTS for key in d} | {"extra", "", "typ", "lease_id\x00"})
ANY_VALUE = st.one_of(
    st.sampled_from(EVIL_VALUES),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(),
    st.text(max_size=40),
    st.binary(max_size=20),
    st.lists(st.integers(), max_size=3),
)


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    """A valid request dict, mutated: wrong types, huge or negative
    numbers, hostile ids, unknown fields, missing fields, a wrong tag."""
    d = dict(draw(st.sampled_from(VALID_REQUESTS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "set", "del", "add", "tag"]))
        if op == "set" and d:
            d[draw(st.sampled_from(sorted(d)))] = draw(ANY_VALUE)
        elif op == "del" and d:
            del d[draw(st.sampled_from(sorted(d)))]
        elif op in ("add", "set"):
            d[draw(st.sampled_from(FIELDS) | st.text(max_size=10))] = draw(ANY_VALUE)
        else:
            d["type"] = draw(st.sampled_from(
                ["hello", "lease", "release", "renew", "bind", "status", "gc", "error", "welcome",
                 "granted", "status_reply", "HELLO", ""]) | ANY_VALUE)
    try:
        return msgspec.json.encode(d)
    except (OverflowError, TypeError):
        assume(False)
        raise AssertionError("unreachable")


REQUEST_TYPES = (Hello, LeaseRequest, Release, Renew, Bind, StatusRequest, GcRequest)


def check_decoded(body: bytes) -> None:
    """decode_request only ever returns a request or raises ProtocolError;
    an id it lets through is rejected by the daemon's id check unless it is
    a real lease id (so it can never name a path outside the root)."""
    try:
        msg = decode_request(body)
    except ProtocolError:
        return
    assert isinstance(msg, REQUEST_TYPES), msg
    if isinstance(msg, (Release, Renew, Bind)):
        assert isinstance(msg.lease_id, str)
        try:
            lease_id = protocol.check_id(msg.lease_id)
        except protocol.BadIdError:
            pass
        else:
            assert protocol.LEASE_ID_RE.fullmatch(lease_id) and not set(lease_id) & set("/.\x00")
    if isinstance(msg, Bind):
        assert type(msg.pid) is int
    if isinstance(msg, LeaseRequest):
        assert msg.transport in ("tcp", "uds")
        assert msg.holder_pid is None or type(msg.holder_pid) is int
        assert msg.ttl is None or isinstance(msg.ttl, float)


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_decode_request_arbitrary_bytes(body: bytes) -> None:
    check_decoded(body)


@FUZZ
@given(mutated_requests())
def test_fuzz_decode_request_mutated_valid_messages(body: bytes) -> None:
    check_decoded(body)


# JSON text that msgspec.json.encode never writes (it sends NaN as null),
# spliced into valid requests.
RAW_TOKENS = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1e-400", b"9" * 5000,
              b'"\\ud800"', b'"\\u0000"', b'"\\udc80x"', b"[" * 100 + b"]" * 100]


@FUZZ
@given(st.sampled_from(VALID_REQUESTS), st.sampled_from(FIELDS), st.sampled_from(RAW_TOKENS), st.booleans())
def test_fuzz_decode_request_raw_json_tokens(
    request: dict[str, Any], field: str, token: bytes, duplicate_type: bool
) -> None:
    body = msgspec.json.encode({**request, field: "\x00SLOT"}).replace(b'"\\u0000SLOT"', token)
    if duplicate_type:
        body = body[:-1] + b',"type":"gc"}'
    check_decoded(body)


def nested_json(depth: int) -> bytes:
    """A hello with an unknown field nested ``depth`` lists deep."""
    return b'{"x":' + b"[" * depth + b"null" + b"]" * depth + b',"type":"hello","version":1}'


def test_decode_request_deep_nesting_is_a_protocol_error() -> None:
    body = nested_json(1000)
    with pytest.raises(ProtocolError):
        decode_request(body)


# Literal-looking text for the envelope loader: python literal syntax and
# things that are not literals at all.
LITERAL_TOKENS = st.sampled_from([
    "1j", "1e999", "-0", "...", "b''", "set()", "{1, 2}", "f'{x}'", "Ellipsis", "None", "True",
    "lambda: 0", "__import__('os')", "'\\N{BULLET}'", "0x10", "1_000", "(1,)", "()", "[]", "{}",
    "-(1)", "+1", "not 1", "1 + 2", "'a' 'b'", "*a", "**a", "\x00", "'\udcff'", "9" * 5000, "x",
    "'_session_uuid'", "'_bindspace'", "'_registry_addrs'", "'_enable_tpts'", "'_root_mailbox'",
    "'_debug_mode'", "'extra'", "('127.0.0.1', 1616)", "('/x', 'registry@1616.sock')",
])


@st.composite
def envelope_texts(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.text(max_size=300))
    if kind == 1:
        # Splice random text and tokens into a valid envelope.
        _, value = envelope.dump_rtvars({"_session_uuid": str(uuid.uuid4()), "_enable_tpts": ["uds"]})
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(value)))
            cut = draw(st.integers(0, 8))
            value = value[:at] + draw(LITERAL_TOKENS | st.text(max_size=8)) + value[at + cut :]
        return value
    if kind == 2:
        # A dict of known and unknown keys with arbitrary literal values.
        leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
        values = st.recursive(leaves, lambda c: st.lists(c, max_size=3) | st.tuples(c, c)
                              | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=10)
        keys = st.sampled_from([*envelope.RuntimeVars.__struct_fields__, "extra", ""]) | st.text(max_size=8)
        return repr(draw(st.dictionaries(keys, values, max_size=6)))
    return "{" + ", ".join(draw(st.lists(LITERAL_TOKENS, max_size=8))) + "}"


# ast.parse warns about some hostile texts ("1if 1else 2", "'\\['"): noise,
# not failures.
@pytest.mark.filterwarnings("ignore::SyntaxWarning")
@pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")
@FUZZ
@given(st.one_of(st.text(), envelope_texts()))
def test_fuzz_load_rtvars_only_raises_envelope_error(text: str) -> None:
    try:
        rtvars = envelope.load_rtvars({envelope._TRACTOR_RT_VARS_OSENV: text})
    except envelope.EnvelopeError:
        return
    assert isinstance(rtvars, envelope.RuntimeVars)


@st.composite
def live_payloads(draw: st.DrawFn) -> bytes:
    """What a hostile client sends after its Hello: one frame of a mutated
    or random body, sometimes truncated or with a lying header."""
    body = draw(mutated_requests() | st.binary(max_size=200))
    how = draw(st.sampled_from(["frame", "frame", "frame", "truncated", "huge-header", "garbage"]))
    if how == "frame":
        return HEADER.pack(len(body)) + body
    if how == "truncated":
        return HEADER.pack(len(body) + draw(st.integers(1, 1000))) + body
    if how == "huge-header":
        return HEADER.pack(draw(st.integers(MAX_MESSAGE_BYTES + 1, 2**32 - 1))) + body
    return draw(st.binary(max_size=64))


# Every refusal a hostile request may get; "internal" (a daemon bug caught
# by its last-resort handler) is deliberately not among them.
KNOWN_ERROR_CODES = {"protocol", "bad-request", "bad-holder", "unknown-lease", "too-many-leases",
                     "no-free-port", "path-too-long", "collision", "os-error", "version"}


def test_fuzz_live_daemon(runtime: Runtime, tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    daemon = start_daemon(runtime, log)
    sentinel = runtime.base / "sentinel"
    (sentinel / "sub").mkdir(parents=True)
    (sentinel / "a").write_text("keep me")
    (sentinel / "sub" / "b").write_text("keep me too")
    before = tree_snapshot(sentinel)
    control_before = sorted(os.listdir(runtime.control))
    cases = 0

    @settings(max_examples=max(300, FUZZ_EXAMPLES // 7), deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(live_payloads())
    def one(payload: bytes) -> None:
        nonlocal cases
        cases += 1
        with raw_connect(runtime.socket) as sock:
            with contextlib.suppress(OSError):
                sock.sendall(HELLO + payload)
                sock.shutdown(socket.SHUT_WR)
            replies = split_frames(read_to_eof(sock))
        assert_one_exchange(replies)
        for reply in replies:
            assert not isinstance(reply, Error) or reply.code in KNOWN_ERROR_CODES, reply
        assert daemon.poll() is None, f"the daemon died: {log.read_text()[-3000:]}"

    one()
    assert cases >= 100
    assert daemon.poll() is None
    assert_served(runtime, "tcp")
    assert tree_snapshot(sentinel) == before, "something outside the runtime root changed"
    assert sorted(os.listdir(runtime.base)) == ["sentinel", "tractor", "tractor-session"]
    assert sorted(os.listdir(runtime.control)) == control_before
    assert_root_clean(runtime)
    assert "internal error" not in log.read_text(), "a fuzzed request hit a daemon bug; see its log"


HOSTILE_VALUES: list[tuple[str, Callable[[str], protocol.Message], tuple[str, ...]]] = [
    ("holder -1", lambda lid: LeaseRequest("uds", holder_pid=-1), ("bad-holder",)),
    ("holder 0", lambda lid: LeaseRequest("uds", holder_pid=0), ("bad-holder",)),
    ("holder 1", lambda lid: LeaseRequest("uds", holder_pid=1), ("bad-holder",)),
    ("holder -2**63", lambda lid: LeaseRequest("uds", holder_pid=-(2**63)), ("bad-holder",)),
    ("holder 2**64-1", lambda lid: LeaseRequest("uds", holder_pid=2**64 - 1), ("bad-holder",)),
    ("holder 2**31", lambda lid: LeaseRequest("uds", holder_pid=2**31), ("bad-holder",)),
    ("ttl nan", lambda lid: LeaseRequest("uds", ttl=math.nan), ("bad-request",)),
    ("ttl inf", lambda lid: LeaseRequest("uds", ttl=math.inf), ("bad-request",)),
    ("ttl -1", lambda lid: LeaseRequest("uds", ttl=-1.0), ("bad-request",)),
    ("ttl 0", lambda lid: LeaseRequest("uds", ttl=0.0), ("bad-request",)),
    ("ttl 1e300", lambda lid: LeaseRequest("uds", ttl=1e300), ("bad-request",)),
    ("parent ../../x", lambda lid: LeaseRequest("uds", parent="../../x"), ("bad-request", "unknown-lease")),
    ("parent NUL", lambda lid: LeaseRequest("uds", parent="\x00"), ("bad-request", "unknown-lease")),
    ("renew ttl nan", lambda lid: Renew(lid, math.nan), ("bad-request",)),
    ("renew ttl -2**70", lambda lid: Renew(lid, -(2.0**70)), ("bad-request",)),
    ("bind pid -5", lambda lid: Bind(lid, -5), ("bad-holder",)),
    ("bind pid 2**64-1", lambda lid: Bind(lid, 2**64 - 1), ("bad-holder",)),
    ("gc grace -1", lambda lid: GcRequest(True, -1.0), ("bad-request",)),
    ("gc grace nan", lambda lid: GcRequest(False, math.nan), ("bad-request",)),
    ("gc grace inf", lambda lid: GcRequest(False, math.inf), ("bad-request",)),
]


def test_hostile_values_are_refused_cleanly(runtime: Runtime, tmp_path: Path) -> None:
    """Negative, zero, huge and non-finite numbers, hostile parent ids: each
    gets its error and costs nothing (same connection, same single lease).
    Non-finite numbers are refused by the client, as JSON cannot carry them."""
    start_daemon(runtime, tmp_path / "daemon.log")
    with connect(runtime) as conn:
        held = conn.lease("uds")
        for what, make, codes in HOSTILE_VALUES:
            err = client_error(lambda: conn.call(msgspec.to_builtins(make(held.lease.lease_id))))
            assert err.code in codes, (what, err)
            assert [lease.lease_id for lease in conn.status().leases] == [held.lease.lease_id], what
        conn.release(held.lease.lease_id)
    assert os.listdir(runtime.root) == []


def test_hostile_parent_id_is_validated_and_not_echoed(runtime: Runtime, tmp_path: Path) -> None:
    start_daemon(runtime, tmp_path / "daemon.log")
    with connect(runtime) as conn:
        err = client_error(lambda: conn.lease("uds", parent="a" * 10000))
        assert err.code in ("bad-request", "unknown-lease"), err
        assert len(str(err)) < 300, f"the error echoes the whole hostile id ({len(str(err))} chars)"
    assert os.listdir(runtime.root) == []


HOSTILE_IDS = ["../../x", "/etc", "a" * 10000, "\x00", "../sentinel", "..", "/", "",
               "0123456789ab/..", "0123456789AB", "0123456789ab\n", str(uuid.uuid1())]


@pytest.mark.parametrize("make", [
    pytest.param(lambda i: Release(i), id="release"),
    pytest.param(lambda i: Renew(i, 5.0), id="renew"),
    pytest.param(lambda i: Bind(i, os.getpid()), id="bind"),
])
def test_hostile_ids_are_bad_requests(runtime: Runtime, tmp_path: Path, make: Callable[[str], Any]) -> None:
    start_daemon(runtime, tmp_path / "daemon.log")
    sentinel = runtime.base / "sentinel"
    sentinel.mkdir()
    (sentinel / "a").write_text("keep me")
    before = tree_snapshot(runtime.base / "sentinel")
    with connect(runtime) as conn:
        held = conn.lease("uds")
        for lease_id in HOSTILE_IDS:
            err = client_error(lambda: conn.call(msgspec.to_builtins(make(lease_id))))
            assert err.code == "bad-request", (lease_id[:40], err)
            assert len(str(err)) < 300, "the error echoes the whole hostile id"
        # The connection and its lease survived every refusal.
        assert [lease.lease_id for lease in conn.status().leases] == [held.lease.lease_id]
        conn.release(held.lease.lease_id)
    assert tree_snapshot(sentinel) == before
    assert_root_clean(runtime)
    assert runtime.bindspaces() == []


def test_deeply_nested_frame_does_not_kill_the_daemon(runtime: Runtime, tmp_path: Path) -> None:
    """Thousands of nested lists, which make msgspec recurse: the daemon
    must lose only that one connection."""
    log = tmp_path / "daemon.log"
    daemon = start_daemon(runtime, log)
    with connect(runtime) as good:
        held = good.lease("uds")
        for depth in (1000, 5000, 30000):  # 30000: ~60 KB, under the size limit
            body = nested_json(depth)
            with raw_connect(runtime.socket) as sock:
                sock.sendall(HELLO + HEADER.pack(len(body)) + body)
                sock.shutdown(socket.SHUT_WR)
                replies = split_frames(read_to_eof(sock))
            assert daemon.poll() is None, f"the daemon died: {log.read_text()[-2000:]}"
            assert_one_exchange(replies)
            assert isinstance(replies[-1], Error) and replies[-1].code == "protocol", replies
        assert_served(runtime)
        good.release(held.lease.lease_id)


# -- a daemon that answers nonsense -------------------------------------------

WELCOME = b'{"type":"welcome","version":1,"daemon_pid":1}'
BAD_REPLIES: dict[str, tuple[list[bytes], str]] = {
    # name: (the frame bodies sent back, the client's error code)
    "not-json": ([b"\xff\xfe{nope"], "protocol"),
    "not-an-object": ([b"[1, 2]"], "protocol"),
    "welcome-without-pid": ([b'{"type":"welcome","version":1}'], "protocol"),
    "error-without-message": ([WELCOME, b'{"type":"error","code":5}'], "protocol"),
    "granted-without-lease": ([WELCOME, b'{"type":"granted","env":{}}'], "protocol"),
    "env-not-strings": ([WELCOME, b'{"type":"granted","lease":{"lease_id":"x"},"env":{"A":1}}'], "protocol"),
    "env-value-with-nul": ([WELCOME, b'{"type":"granted","lease":{"lease_id":"x"},"env":{"A":"\\u0000"}}'], "protocol"),
    "env-name-with-equals": ([WELCOME, b'{"type":"granted","lease":{"lease_id":"x"},"env":{"A=B":"c"}}'], "protocol"),
    "env-lone-surrogate": ([WELCOME, b'{"type":"granted","lease":{"lease_id":"x"},"env":{"A":"\\ud800"}}'], "protocol"),
    "wrong-reply-type": ([WELCOME, b'{"type":"bound","lease_id":"x"}'], "protocol"),
    "pid-of-5000-digits": ([b'{"type":"welcome","version":1,"daemon_pid":' + b"9" * 5000 + b"}"], "protocol"),
    "nan": ([b'{"type":"welcome","version":1,"daemon_pid":NaN}'], "protocol"),
    "huge-length": ([], "protocol"),
    "closes-mid-frame": ([], "unreachable"),
}


@contextlib.contextmanager
def fake_daemon(runtime: Runtime, name: str) -> Iterator[None]:
    """A listener on the control socket that reads each client's first
    bytes and answers with ``BAD_REPLIES[name]``: real sockets, hostile
    replies (no daemon of ours can be made to send these)."""
    bodies, _ = BAD_REPLIES[name]
    if name == "huge-length":
        answer = HEADER.pack(2**32 - 1)
    elif name == "closes-mid-frame":
        answer = HEADER.pack(100) + b"{"
    else:
        answer = b"".join(HEADER.pack(len(body)) + body for body in bodies)
    runtime.control.mkdir(mode=0o700, parents=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(runtime.socket))
    listener.listen()
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(DEADLINE)
                conn.recv(65536)
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(DEADLINE)
        listener.close()


@pytest.mark.parametrize("name", list(BAD_REPLIES))
def test_nonsense_from_the_daemon_is_a_clear_error_and_runs_nothing(runtime: Runtime, tmp_path: Path, name: str) -> None:
    marker = tmp_path / "ran"
    with fake_daemon(runtime, name):
        res = runtime.cli("lease", "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')")
        err = client_error(lambda: client.connect(autostart=False, environ=runtime.env).lease())
    assert res.returncode == 1, res
    assert res.stderr.startswith("tractor-session: ") and "Traceback" not in res.stderr, res.stderr
    assert not marker.exists(), "the command ran without a session"
    assert err.code == BAD_REPLIES[name][1], err
