"""Limits and exhaustion: the daemon refuses what is over a limit (message
size, a slow or silent client, connections, leases) with an error that
says which limit, keeps serving everyone else meanwhile, and fails cleanly
and recovers when the machine runs out (a full filesystem, no file
descriptors left), never ending a live lease for it.

Real daemon processes over real unix sockets, real resource limits
(``setrlimit`` in the daemon before exec) and a real full filesystem (a
small tmpfs, as root); nothing of ours is mocked.  Each daemon logs to a
file of its own, every wait is a deadline (``wait_for`` or a socket
timeout), and every process is killed at teardown by the ``runtime``
fixture.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
from conftest import (
    CLI,
    DEADLINE,
    HELLO,
    PortPool,
    Runtime,
    assert_served,
    client_error,
    daemon_status,
    exchange,
    handshake,
    kill_tree,
    needs_root,
    private_pool,
    raw_connect,
    read_to_eof,
    recv_reply,
    split_frames,
    wait_for,
)

from tractor_session import protocol
from tractor_session.daemon.control import BACKLOG
from tractor_session.protocol import Error, Granted, Hello, LeaseRequest, StatusRequest, Welcome, frame
from tractor_session.wire import HEADER, PROTOCOL_VERSION

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc, rlimits and tmpfs")


# -- limits -------------------------------------------------------------------------


def test_oversized_message_is_refused_while_others_are_served(runtime: Runtime, tmp_path: Path) -> None:
    runtime.start_daemon("--max-message-bytes", "1024", log=tmp_path / "daemon.log")
    with runtime.connect() as good:
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
    runtime.start_daemon("--request-timeout", "0.5", log=tmp_path / "daemon.log")
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
            # Both bad clients are connected and not done: others get served,
            # through the library and through the CLI.
            for _ in range(3):
                assert_served(runtime)
            assert runtime.cli("lease", "--", "true").returncode == 0
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
    # A client that stalls mid-frame (a header, part of its body) is cut
    # off too, with a protocol error.
    replies = exchange(runtime, HEADER.pack(100) + b"x" * 10, shut_wr=False)
    assert [r.code for r in replies if isinstance(r, Error)] == ["protocol"], replies


def test_silent_clients_do_not_hold_up_others(runtime: Runtime, pool: PortPool) -> None:
    request_timeout = 30.0
    daemon = runtime.start_daemon("--port-pool", str(pool), "--request-timeout", str(request_timeout))
    silent = []
    try:
        for _ in range(100):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            silent.append(sock)
            sock.connect(str(runtime.socket))
        start = time.monotonic()
        assert daemon_status(runtime).daemon_pid == daemon.pid
        res = runtime.cli("lease", "--", "true")
        elapsed = time.monotonic() - start
        assert res.returncode == 0, res.stderr
        # Served right away, not after the silent ones timed out.
        assert elapsed < request_timeout, elapsed
    finally:
        for sock in silent:
            sock.close()


def test_idle_connections_are_cut_to_make_room_and_lease_holders_never_are(runtime: Runtime, tmp_path: Path) -> None:
    """A same-user flood of idle connections up to ``--max-connections``
    (that said hello, the oldest trickling a frame) no longer starves
    everyone else: each new connection cuts the one idle longest, with a
    ``busy`` error, while the connections that hold a lease (older still)
    are never cut and keep working."""
    limit = 16
    runtime.start_daemon("--max-connections", str(limit), log=tmp_path / "daemon.log")
    with contextlib.ExitStack() as stack:
        holders = [stack.enter_context(runtime.connect()) for _ in range(2)]
        leases = [conn.lease("uds").lease.lease_id for conn in holders]
        idle = []
        for _ in range(limit - len(holders)):
            idle.append(sock := stack.enter_context(raw_connect(runtime.socket)))
            handshake(sock)  # one at a time: the daemon sees them idle in this order
        idle[0].sendall(HELLO[:3])  # a frame begun, never finished
        res = runtime.cli("lease", "--", "true")
        assert res.returncode == 0, res.stderr
        assert runtime.cli("status").returncode == 0
        for conn, lease_id in zip(holders, leases, strict=True):
            assert [info.lease_id for info in conn.status().leases if info.lease_id == lease_id] == [lease_id]
        # The lease made room by cutting the oldest idle one, with a word
        # why (the status found the room it had left); no other was cut.
        replies = split_frames(read_to_eof(idle[0]))
        assert [(r.code, "idle" in r.message) for r in replies if isinstance(r, Error)] == [("busy", True)], replies
        for sock in idle[1:]:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
    wait_for(lambda: runtime.bindspaces() == [], what="the connections' leases to end with them")


def test_a_library_connection_cut_while_idle_reconnects_by_itself(runtime: Runtime, tmp_path: Path) -> None:
    """A connection that holds no lease carries nothing: cut while idle,
    its next request goes out on a new one.  One that holds a lease is
    never cut."""
    runtime.start_daemon("--max-connections", "2", log=tmp_path / "daemon.log")
    with runtime.connect() as idle, runtime.connect() as bound, runtime.connect() as newcomer:
        daemon_pid = idle.status().daemon_pid
        lease_id = bound.lease("uds").lease.lease_id
        assert newcomer.status().daemon_pid == daemon_pid  # cut `idle` to get in
        assert [info.lease_id for info in idle.status().leases] == [lease_id]
        assert [info.lease_id for info in bound.status().leases] == [lease_id]
        bound.release(lease_id)


def test_a_client_refused_as_busy_retries_within_its_deadline(runtime: Runtime, tmp_path: Path) -> None:
    """When every connection holds a lease, a new one is refused ``busy``
    (nothing can be cut); a client retries, and gets in once a slot
    frees."""
    limit = 4
    log = tmp_path / "daemon.log"
    runtime.start_daemon("--max-connections", str(limit), log=log)
    with contextlib.ExitStack() as stack:
        holders = [stack.enter_context(runtime.connect()) for _ in range(limit)]
        for conn in holders:
            conn.lease("uds")
        status = runtime.popen([*CLI, "status", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # Its first try refused (the log is only the signal to go on).
        wait_for(lambda: "refused a connection: all 4" in log.read_text() or status.poll() is not None,
                 what="the daemon to refuse the status client")
        holders.pop().close()
        out, err = status.communicate(timeout=DEADLINE)
        assert status.returncode == 0, err
        assert len(json.loads(out)) == limit - 1
        # Still full: a raw connection is told so at once, asked nothing.
        stack.enter_context(runtime.connect()).lease("uds")
        with raw_connect(runtime.socket) as refused:
            replies = split_frames(read_to_eof(refused))
        assert [(r.code, "none idle" in r.message) for r in replies if isinstance(r, Error)] == [("busy", True)], replies


def test_a_client_waits_for_room_in_a_full_connection_queue(runtime: Runtime) -> None:
    """A full queue of connections (a flood the daemon has not accepted
    yet; here, a stopped daemon's) is waited out, not an instant EAGAIN."""
    syscall = {"x86_64": 42, "aarch64": 203}.get(platform.machine())
    if syscall is None:
        pytest.skip(f"connect's syscall number on {platform.machine()} is not known here")
    daemon = runtime.start_daemon()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    queue = min(BACKLOG, int(Path("/proc/sys/net/core/somaxconn").read_text()))
    if hard < queue + 200:
        pytest.skip(f"filling a queue of {queue} needs more than {hard} file descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    queued: list[socket.socket] = []
    daemon.send_signal(signal.SIGSTOP)
    try:
        while len(queued) <= queue + 1:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(str(runtime.socket))
            except BlockingIOError:
                sock.close()
                break
            queued.append(sock)
        else:
            raise AssertionError(f"{len(queued)} connections queued and the queue is still not full")
        status = runtime.popen([*CLI, "status"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def in_connect() -> bool:
            try:
                return Path(f"/proc/{status.pid}/syscall").read_text().split()[0] == str(syscall)
            except (OSError, IndexError):
                return False

        wait_for(lambda: in_connect() or status.poll() is not None, what="the client to try to connect")
    finally:
        daemon.send_signal(signal.SIGCONT)
        for sock in queued:
            sock.close()
    out, err = status.communicate(timeout=DEADLINE)
    assert status.returncode == 0, err
    assert f"daemon pid {daemon.pid}" in out.decode()


def test_lease_limit_gives_too_many_leases(runtime: Runtime, tmp_path: Path) -> None:
    runtime.start_daemon("--max-leases", "3", log=tmp_path / "daemon.log")
    with runtime.connect() as greedy, runtime.connect() as good:
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


@contextlib.contextmanager
def squatted(pool: PortPool, kind: socket.SocketKind) -> Iterator[list[socket.socket]]:
    """Every port of ``pool`` bound on 127.0.0.1 with ``kind``, as another
    user can do without any privilege; unbound at the end."""
    squatters: list[socket.socket] = []
    try:
        for port in range(pool.low, pool.high + 1):
            sock = socket.socket(socket.AF_INET, kind)
            squatters.append(sock)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError as err:
                pytest.skip(f"port {port} of the private pool is in use: {err}")
        yield squatters
    finally:
        for sock in squatters:
            sock.close()


def test_a_pool_squatted_on_udp_still_grants_tcp_leases(runtime: Runtime, tmp_path: Path) -> None:
    """UDP sockets on every port of the pool take nothing from a TCP registry."""
    pool = private_pool(16)
    with squatted(pool, socket.SOCK_DGRAM):
        runtime.start_daemon("--port-pool", str(pool), log=tmp_path / "daemon.log")
        granted = assert_served(runtime, "tcp")
    assert granted.lease.port is not None and pool.low <= granted.lease.port <= pool.high


def test_a_pool_squatted_on_tcp_refuses_tcp_leases_and_serves_the_rest(runtime: Runtime, tmp_path: Path) -> None:
    """What the README says a squatted pool does: a tcp lease is refused
    with ``no-free-port`` and what to do; uds leases and every other
    request are served; a port the squatter lets go is handed out."""
    pool = private_pool(16)
    runtime.start_daemon("--port-pool", str(pool), log=tmp_path / "daemon.log")
    with runtime.connect() as conn, squatted(pool, socket.SOCK_STREAM) as squatters:
        for _ in range(3):
            err = client_error(lambda: conn.lease("tcp"))
            assert err.code == "no-free-port" and f"no free port in {pool}" in str(err), err
            assert "--tpt-proto uds" in str(err), err
        assert_served(runtime, "uds")
        assert runtime.bindspaces() == []
        squatters.pop(5).close()
        assert conn.lease("tcp").lease.port == pool.low + 5


# -- resource exhaustion ------------------------------------------------------------


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


@needs_root("mounting a tmpfs")
@pytest.mark.parametrize("resource_", ["space", "inodes"])
def test_full_filesystem_fails_cleanly_and_recovers(runtime: Runtime, tmp_path: Path, resource_: str) -> None:
    port, _ = private_pool(1)
    size, inodes = ("2m", 1000) if resource_ == "space" else ("8m", 64)
    with small_tmpfs(runtime, size, inodes) as mnt:
        daemon = runtime.start_daemon("--port-pool", f"{port}-{port}", log=tmp_path / "daemon.log")
        assert assert_served(runtime, "tcp").lease.port == port
        filler = mnt / "filler"
        fill_space(filler) if resource_ == "space" else fill_inodes(filler)

        with runtime.connect() as conn:
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

    daemon = runtime.start_daemon(log=tmp_path / "daemon.log", preexec_fn=lower_soft_limit)
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
        daemon = runtime.start_daemon("--gc-interval", gc_interval, log=log, preexec_fn=low_fd_limit)
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
    runtime: Runtime, starve: Callable[..., Starved]
) -> None:
    st_ = starve()
    daemon, conns = st_.daemon, st_.conns
    holder = runtime.holder()
    sock = conns[0]
    sock.sendall(frame(LeaseRequest("uds", holder_pid=holder.pid)))
    reply = recv_reply(sock)
    assert daemon.poll() is None
    assert runtime.bindspaces() == []
    assert isinstance(reply, Error) and reply.code == "os-error", reply
    assert "file descriptors" in reply.message, reply


def test_out_of_file_descriptors_never_ends_a_live_lease(
    runtime: Runtime, starve: Callable[..., Starved]
) -> None:
    st_ = starve()
    daemon, conns, limit = st_.daemon, st_.conns, st_.limit
    holder = runtime.holder()
    sock = conns[0]
    # Exactly two fds free: enough for every transient open of a grant (its
    # bindspace's directory fd, and its record's, open together).
    conns.pop().close()
    conns.pop().close()
    wait_for(lambda: open_fds(daemon.pid) == limit - 2, what="the daemon to close two connections")
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




def test_a_connection_whose_leases_were_released_elsewhere_can_be_cut(runtime: Runtime, tmp_path: Path) -> None:
    """Leases a connection took but another released no longer keep it:
    with room for two, two such connections must not lock everyone out."""
    runtime.start_daemon("--max-connections", "2", log=tmp_path / "daemon.log")
    with runtime.connect() as first, runtime.connect() as second:
        lease_1 = first.lease("uds").lease.lease_id
        lease_2 = second.lease("uds").lease.lease_id
        first.release(lease_2)
        second.release(lease_1)
        res = runtime.cli("status", timeout=60)
        assert res.returncode == 0, res.stderr


def test_a_library_connection_whose_lease_was_released_reconnects_once_cut(runtime: Runtime, tmp_path: Path) -> None:
    """Once its lease is released, a connection carries nothing again: cut
    while idle, its next request goes out on a new one."""
    runtime.start_daemon("--max-connections", "2", log=tmp_path / "daemon.log")
    with runtime.connect() as released, runtime.connect() as other:
        daemon_pid = other.status().daemon_pid
        released.release(released.lease("uds").lease.lease_id)
        other.status()  # `released` is now the one idle longest
        with runtime.connect() as newcomer:
            assert newcomer.status().daemon_pid == daemon_pid  # cut `released` to get in
        assert released.status().daemon_pid == daemon_pid
