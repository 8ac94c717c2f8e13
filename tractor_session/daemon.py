"""The per-user daemon: grants leases and cleans up after dead sessions.

One trio task serves each client connection; one task per holder process
waits (on a pidfd) for it to die, and one task ends leases whose ttl runs
out.  Lease bookkeeping is synchronous (see :mod:`tractor_session.leases`),
so requests never race each other between two awaits; only reaping a
session's processes, which waits out a grace period, and garbage sweeps
happen in the background.

Stopping (SIGTERM, SIGINT) keeps every live lease on disk: the next daemon
re-adopts them.
"""

from __future__ import annotations

import fcntl
import functools
import heapq
import logging
import math
import os
import resource
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import psutil
import trio

from tractor_session import garbage, paths, protocol, reaper, systemd, wire
from tractor_session.leases import (
    BINDSPACE_NAME_RE,
    Lease,
    LeaseError,
    LeaseTable,
    explain_os_error,
    read_record,
)
from tractor_session.liveness import (
    HolderKey,
    HolderWatches,
    Process,
    is_alive,
    last_pid,
    start_time,
)
from tractor_session.paths import short_name
from tractor_session.ports import DEFAULT_POOL, PortPool, PortPoolError
from tractor_session.protocol import (
    Bind,
    Bound,
    Error,
    GcItem,
    GcReport,
    GcRequest,
    Granted,
    Hello,
    LeaseRequest,
    Reaped,
    Release,
    Released,
    Renew,
    Renewed,
    Status,
    StatusRequest,
    Welcome,
)
from tractor_session.wire import ProtocolError

log = logging.getLogger("tractor_session.daemon")

_PEERCRED = struct.Struct("3i")
CONNECTION_CLOSED = "its holder's connection closed"


@dataclass
class Config:
    """Everything the daemon can be told; defaults suit a dev box."""

    root: Path
    socket: Path
    port_pool: range = DEFAULT_POOL
    reap_grace: float = 3.0
    max_message_bytes: int = wire.MAX_MESSAGE_BYTES
    request_timeout: float = 5.0
    idle_timeout: float = 60.0
    max_connections: int = 1024
    max_leases: int = 20000
    gc_interval: float = 60.0
    gc_grace: float = garbage.DEFAULT_GRACE


class AlreadyRunning(RuntimeError):
    pass


def acquire_daemon_lock(control_dir: Path) -> int:
    """Take the one-daemon-per-user lock; return its fd (keep it open).

    ``flock`` is atomic in the kernel, so of two daemons started in the same
    millisecond exactly one gets it; it is released when the process dies,
    however it dies.
    """
    lock_path = control_dir / "daemon.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise AlreadyRunning(
            f"another tractor-session daemon (pid {holder}) is already running"
            f" for {control_dir}; stop it first or use it"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a unix socket."""
    if hasattr(socket, "SO_PEERCRED"):
        pid, uid, _gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        return pid, uid
    # macOS and the BSDs: the uid only.
    uid, _gid = os.getpeereid(sock.fileno())  # type: ignore[attr-defined]
    return 0, uid


class FrameReader:
    """Reads length-prefixed frames with a size limit and two clocks: how
    long a connection may sit idle, and how long one frame may take once it
    has started (so a client trickling bytes cannot hold a slot forever)."""

    def __init__(self, stream: trio.SocketStream, limit: int, frame_timeout: float) -> None:
        self.stream = stream
        self.limit = limit
        self.frame_timeout = frame_timeout
        self.buf = bytearray()

    async def read(self, idle_timeout: float) -> bytes | None:
        """The next frame's body, or None at a clean end of stream."""
        if not self.buf:
            if idle_timeout == math.inf:  # no cancel scope: this is per request
                data = await self.stream.receive_some(65536)
            else:
                data = b""
                with trio.move_on_after(idle_timeout) as idle:
                    data = await self.stream.receive_some(65536)
                if idle.cancelled_caught:
                    raise ProtocolError(f"no request within {idle_timeout:g} s; closing")
            if not data:
                return None
            self.buf += data
        # Fast path: a small request arrives whole in one read.
        if (body := self._take_frame()) is not None:
            return body
        with trio.move_on_after(self.frame_timeout):
            while (body := self._take_frame()) is None:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise ProtocolError("connection closed mid-message")
                self.buf += data
            return body
        raise ProtocolError(f"incomplete request after {self.frame_timeout:g} s; closing")

    def _take_frame(self) -> bytes | None:
        size = wire.HEADER.size
        if len(self.buf) < size:
            return None
        end = size + wire.body_length(bytes(self.buf[:size]), self.limit)
        if len(self.buf) < end:
            return None
        body = bytes(self.buf[size:end])
        del self.buf[:end]
        return body


class LeftoverScanner:
    """Finds sessions' leftover processes, many sessions per scan.

    A scan reads every process of the user, so when a thousand leases end
    at once (their holder died, a daemon restarted) they share one scan
    instead of queueing for a thousand.  Requests that arrive while a scan
    runs are served together by the next one.
    """

    def __init__(self) -> None:
        self._lock = trio.Lock()
        self._batch = _ScanBatch()

    async def find(self, session_id: str) -> list[reaper.Victim]:
        batch = self._batch
        batch.ids.add(session_id)
        if not batch.started:
            batch.started = True
            try:
                async with self._lock:
                    # From here on, new requests go to the next batch.
                    self._batch = _ScanBatch()
                    batch.found = await trio.to_thread.run_sync(reaper.sessions_processes, batch.ids)
            except Exception as err:
                batch.error = err
                raise
            finally:
                batch.done.set()
        await batch.done.wait()
        if batch.error is not None:
            raise RuntimeError(f"scanning for leftover processes failed: {batch.error!r}")
        return batch.found.get(session_id, [])


@dataclass
class _ScanBatch:
    ids: set[str] = field(default_factory=set)
    started: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    found: dict[str, list[reaper.Victim]] = field(default_factory=dict)
    error: Exception | None = None


def _check_ttl(ttl: float) -> None:
    if not 0 < ttl < 10**9:  # also refuses NaN
        raise LeaseError("bad-request", f"ttl must be a positive number of seconds, not {ttl}")


class Peer:
    """The process at the other end of a connection.  Its start time is
    read once, on its first connection-held lease."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def lineage(self) -> frozenset[int]:
        """The peer and its ancestors."""
        try:
            proc = psutil.Process(self.pid)
            return frozenset([self.pid, *(p.pid for p in proc.parents())])
        except psutil.Error:
            return frozenset([self.pid])

    @functools.cached_property
    def start(self) -> float | None:
        # The pid is unknown (0) on macOS and across pid namespaces: then
        # only the connection bounds its leases.
        return start_time(self.pid) if self.pid > 0 else None


class Daemon:
    def __init__(self, config: Config, notifier: systemd.Notifier) -> None:
        self.config = config
        self.notifier = notifier
        self.table = LeaseTable(config.root, PortPool(config.port_pool), config.socket)
        self.ending: dict[str, trio.Event] = {}
        # One watch per holder process, however many leases it holds.
        self.by_holder: dict[HolderKey, set[str]] = {}
        self.holder_watches = HolderWatches(self._holder_exited)
        # (wall-clock expiry, lease id); stale entries are skipped.
        self.expiries: list[tuple[float, str]] = []
        self._expiries_changed = trio.Event()
        self.scanner = LeftoverScanner()
        # Leases bound to a connection of this daemon; ended by its handler.
        self.connected: set[str] = set()
        # lease id -> the host's last pid just before its envelope existed.
        self.spawn_marks: dict[str, int] = {}
        self.connections = 0
        self.readopted = 0
        # Set on SIGTERM/SIGINT: from then on nothing ends a lease, so that
        # every live one stays on disk for the next daemon.
        self.stopping = False
        self._nursery: trio.Nursery | None = None

    # -- lifecycle ------------------------------------------------------

    async def run(self, listener: trio.SocketListener, on_ready: Callable[[], None]) -> None:
        """Serve until cancelled (the caller maps SIGTERM/SIGINT to that)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.recover()
            nursery.start_soon(self._expire_leases)
            nursery.start_soon(trio.serve_listeners, self._serve_connection, [listener])
            nursery.start_soon(self._sweep_periodically)
            on_ready()
            log.info(
                "serving %s: root %s, %d leases re-adopted, ports %d-%d",
                self.config.socket, self.config.root, self.readopted,
                self.config.port_pool.start, self.config.port_pool.stop - 1,
            )

    def recover(self) -> None:
        """Re-adopt the leases an earlier daemon left on disk."""
        assert self._nursery is not None
        try:
            names = os.listdir(self.config.root)
        except FileNotFoundError:
            return
        dead = 0
        for name in names:
            if not BINDSPACE_NAME_RE.fullmatch(name):
                continue
            record = read_record(self.config.root / name)
            if record is None:
                continue
            lease = self.table.adopt(record)
            if is_alive(record.holder_pid or 0, record.holder_start):
                self._track(lease)
            else:
                dead += 1
                self._end_in_background(lease, "holder died while no daemon ran")
        if dead:
            log.info("recovery: ending %d leases whose holders died meanwhile", dead)
        self.readopted = len(self.table) - dead

    # -- connections ----------------------------------------------------

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        held: list[Lease] = []
        self.connections += 1
        try:
            pid, uid = peer_credentials(stream.socket)
            if uid != os.getuid():
                log.warning("refused a connection from uid %d (pid %d): not our user", uid, pid)
                await self._send(stream, Error("forbidden", "this daemon serves only its own user"))
                return
            if self.connections > self.config.max_connections:
                await self._send(stream, Error(
                    "busy",
                    f"the daemon has {self.config.max_connections} connections open"
                    " (its limit); retry shortly",
                ))
                return
            reader = FrameReader(stream, self.config.max_message_bytes, self.config.request_timeout)
            await self._converse(stream, reader, Peer(pid), held)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except ProtocolError as err:
            log.info("dropping a client: %s", err)
            await self._send(stream, Error("protocol", str(err)))
        except Exception as err:
            # A bug must cost one connection, never the daemon and every
            # lease it holds.
            log.exception("internal error serving a client")
            await self._send(stream, Error("internal", f"the daemon hit an internal error: {err!r}; see its log"))
        finally:
            self.connections -= 1
            await stream.aclose()
            for lease in held:
                self.connected.discard(lease.lease_id)
                self._end_in_background(lease, CONNECTION_CLOSED)

    async def _send(self, stream: trio.SocketStream, msg: protocol.Message) -> None:
        """A last word before closing: best effort, never stuck."""
        with trio.move_on_after(self.config.request_timeout):
            try:
                await stream.send_all(protocol.frame(msg))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _converse(
        self, stream: trio.SocketStream, reader: FrameReader, peer: Peer, held: list[Lease]
    ) -> None:
        body = await reader.read(self.config.request_timeout)
        if body is None:
            return
        hello = protocol.decode_request(body)
        if not isinstance(hello, Hello):
            raise ProtocolError("expected a hello first")
        if hello.version != wire.PROTOCOL_VERSION:
            await self._send(stream, Error(
                "version",
                f"protocol version mismatch: client speaks {hello.version}, daemon"
                f" (pid {os.getpid()}) speaks {wire.PROTOCOL_VERSION}. Stop the"
                " daemon (`kill` it) so that a matching one starts, or upgrade.",
            ))
            return
        welcome = protocol.frame(Welcome(wire.PROTOCOL_VERSION, os.getpid()))
        if not reader.buf:
            await stream.send_all(welcome)
            welcome = b""
        # else the client sent its first request right behind the Hello:
        # the Welcome goes out with its reply, one wake-up of the client
        # instead of two.
        while True:
            idle = math.inf if held else self.config.idle_timeout
            body = await reader.read(idle)
            if body is None:
                return
            try:
                request = protocol.decode_request(body)
                reply = await self._handle(request, peer, held)
            except ProtocolError:
                if welcome:
                    await stream.send_all(welcome)
                raise
            except LeaseError as err:
                reply = Error(err.code, str(err))
            except protocol.BadIdError as err:
                reply = Error("bad-request", str(err))
            except OSError as err:
                log.warning("request %s failed: %s", type(request).__name__, err)
                reply = Error("os-error", explain_os_error(err, self.config.root))
            with trio.move_on_after(self.config.request_timeout) as stuck:
                await stream.send_all(welcome + protocol.frame(reply))
            if stuck.cancelled_caught:
                raise ProtocolError("the client does not read its replies; closing")
            welcome = b""

    async def _handle(self, request: protocol.Message, peer: Peer, held: list[Lease]) -> protocol.Message:
        match request:
            case LeaseRequest():
                lease = self.grant(request, peer)
                if request.holder_pid is None:
                    held.append(lease)
                return Granted(lease.info(), lease.record.env)
            case Release(lease_id=lease_id):
                lease = self.table.find(protocol.check_id(lease_id))
                if lease in held:
                    held.remove(lease)
                    self.connected.discard(lease.lease_id)
                # The requester may itself run inside the session (a script
                # that leased with --export): it and its ancestors are spared.
                reaped = await self.end_lease(lease, "released", released=True, spare=peer)
                return Released(lease.lease_id, reaped)
            case Renew(lease_id=lease_id, ttl=ttl):
                return self.renew(self.table.find(protocol.check_id(lease_id)), ttl)
            case Bind(lease_id=lease_id, pid=pid):
                lease = self.table.find(protocol.check_id(lease_id))
                start = self._check_holder(pid)
                old_key = self._holder_key(lease)
                self.table.update(lease, holder_pid=pid, holder_start=start)
                self._untrack_holder(lease, old_key)
                self._track(lease)
                return Bound(lease.lease_id)
            case StatusRequest():
                return Status(
                    os.getpid(),
                    str(self.config.root),
                    [lease.info() for lease in self.table.leases.values() if lease.lease_id not in self.ending],
                )
            case GcRequest(dry_run=dry_run, grace=grace):
                if grace is not None and not 0 <= grace < 10**9:
                    raise LeaseError("bad-request", f"grace must be a non-negative number of seconds, not {grace}")
                return GcReport(dry_run, await self.collect(dry_run, grace))
            case Hello():
                raise ProtocolError("hello sent twice")
        raise ProtocolError(f"unsupported request {type(request).__name__}")

    # -- leases ---------------------------------------------------------

    def _check_holder(self, pid: int) -> float:
        """Validate a holder pid named by a client; return its start time."""
        if pid <= 1:
            raise LeaseError("bad-holder", f"holder pid {pid} is not allowed: pick the process whose life bounds the lease")
        start = start_time(pid)
        if start is None:
            raise LeaseError("bad-holder", f"holder pid {pid} does not exist")
        try:
            uid = psutil.Process(pid).uids().real
        except psutil.Error:
            raise LeaseError("bad-holder", f"holder pid {pid} does not exist") from None
        if uid != os.getuid():
            raise LeaseError("bad-holder", f"holder pid {pid} belongs to uid {uid}, not to you")
        return start

    def grant(self, request: LeaseRequest, peer: Peer) -> Lease:
        if len(self.table) >= self.config.max_leases:
            raise LeaseError(
                "too-many-leases",
                f"the daemon holds {len(self.table)} leases, its limit (--max-leases);"
                " release some or run `tractor-session status`",
            )
        if request.ttl is not None:
            _check_ttl(request.ttl)
        if request.parent is not None:
            parent = self.table.find(protocol.check_id(request.parent))
            if parent.lease_id in self.ending:
                raise LeaseError("unknown-lease", f"parent lease {parent.lease_id} is ending")
            request = msgspec.structs.replace(request, parent=parent.lease_id)
        by_connection = request.holder_pid is None
        if by_connection:
            holder, holder_start = peer.pid, peer.start
        else:
            assert request.holder_pid is not None
            holder, holder_start = request.holder_pid, self._check_holder(request.holder_pid)
        mark = last_pid()
        lease = self.table.grant(request, holder if holder > 0 else None, holder_start)
        if by_connection:
            self.connected.add(lease.lease_id)
        if mark is not None:
            self.spawn_marks[lease.lease_id] = mark
        self._track(lease)
        self._announce()
        if log.isEnabledFor(logging.DEBUG):  # info() is work; grants are the hot path
            log.debug(
                "granted %s to pid %s: %s %s", short_name(lease.lease_id), holder,
                lease.record.transport, lease.info().registry_addr,
            )
        return lease

    def _announce(self) -> None:
        self.notifier.send(f"STATUS={len(self.table)} live leases")

    def renew(self, lease: Lease, ttl: float | None) -> Renewed:
        ttl = ttl if ttl is not None else lease.record.ttl
        if ttl is None:
            raise LeaseError("bad-request", f"lease {lease.lease_id} has no ttl; pass --ttl")
        _check_ttl(ttl)
        expires = time.time() + ttl
        self.table.update(lease, ttl=ttl, expires=expires)
        self._track_expiry(lease)
        return Renewed(lease.lease_id, expires)

    # -- what ends a lease by itself: its holder's death, its ttl -------

    def _track(self, lease: Lease) -> None:
        """Watch what can end ``lease`` other than a request.  A lease bound
        to one of our connections needs no pid watch: the connection closes
        when its process dies."""
        if lease.lease_id not in self.connected and lease.record.holder_pid is not None:
            key = self._holder_key(lease)
            self.by_holder.setdefault(key, set()).add(lease.lease_id)
            assert self._nursery is not None
            self.holder_watches.add(self._nursery, key)
        self._track_expiry(lease)

    @staticmethod
    def _holder_key(lease: Lease) -> HolderKey:
        return (lease.record.holder_pid or 0, lease.record.holder_start)

    def _untrack_holder(self, lease: Lease, key: HolderKey | None = None) -> None:
        key = key or self._holder_key(lease)
        if (ids := self.by_holder.get(key)) is not None:
            ids.discard(lease.lease_id)
            if not ids:
                del self.by_holder[key]
                self.holder_watches.remove(key)

    async def _holder_exited(self, key: HolderKey) -> None:
        assert self._nursery is not None
        for lease_id in self.by_holder.pop(key, ()):
            if (lease := self.table.leases.get(lease_id)) is not None:
                self._end_in_background(lease, f"holder pid {key[0]} died")

    def _track_expiry(self, lease: Lease) -> None:
        if lease.record.expires is not None:
            heapq.heappush(self.expiries, (lease.record.expires, lease.lease_id))
            self._expiries_changed.set()

    async def _expire_leases(self) -> None:
        """One task for every ttl: sleeps until the earliest expiry, or
        until a grant or renewal brings an earlier one."""
        assert self._nursery is not None
        while True:
            now = time.time()
            while self.expiries and self.expiries[0][0] <= now:
                _, lease_id = heapq.heappop(self.expiries)
                lease = self.table.leases.get(lease_id)
                # A renewal leaves the old entry behind: the record decides.
                if lease is not None and lease.record.expires is not None and lease.record.expires <= now:
                    self._end_in_background(lease, "its ttl expired")
            self._expiries_changed = trio.Event()
            wait = self.expiries[0][0] - now if self.expiries else math.inf
            with trio.move_on_after(wait):
                await self._expiries_changed.wait()

    def _end_in_background(self, lease: Lease, reason: str) -> None:
        assert self._nursery is not None
        if not self.stopping and not lease.ended and lease.lease_id not in self.ending:
            self._nursery.start_soon(self._end_logging_errors, lease, reason)

    async def _end_logging_errors(self, lease: Lease, reason: str) -> None:
        """A lease that fails to end (out of fds, say) stays live and
        watched; the failure costs a log line, never the daemon."""
        try:
            await self.end_lease(lease, reason)
        except Exception:
            log.exception("could not end lease %s (%s); it stays live", short_name(lease.lease_id), reason)

    async def end_lease(
        self, lease: Lease, reason: str, released: bool = False, spare: Peer | None = None
    ) -> list[Reaped]:
        """End a lease: end its child leases, reap what its session left
        running (but ``spare`` and its ancestors), then free its directory
        and port.  Concurrent calls wait for the first one."""
        if lease.ended or self.stopping:
            return []
        if (done := self.ending.get(lease.lease_id)) is not None:
            await done.wait()
            return []
        done = self.ending[lease.lease_id] = trio.Event()
        reaped: list[Reaped] = []
        try:
            children = [
                child for child_id in self.table.children.get(lease.lease_id, ())
                if (child := self.table.leases.get(child_id)) is not None
            ]
            if children:
                async with trio.open_nursery() as nursery:
                    for child in children:
                        nursery.start_soon(self.end_lease, child, f"its parent {short_name(lease.lease_id)} ended")
            if lease.record.reap and self._may_have_processes(lease):
                reaped = await self.reap(lease.lease_id, spare)
            # Not reached when the daemon stops mid-reap: the lease then stays
            # on disk and the next daemon, finding its holder dead, ends it.
            self.table.end(lease)
            self._untrack_holder(lease)
            self.spawn_marks.pop(lease.lease_id, None)
            self._announce()
        finally:
            del self.ending[lease.lease_id]
            done.set()
        # A release, or a client closing its connection, is routine; a
        # death, an expiry or a reap is worth a line.
        routine = released or reason == CONNECTION_CLOSED
        log.log(
            logging.DEBUG if routine and not reaped else logging.INFO,
            "ended %s (%s)%s", short_name(lease.lease_id), reason,
            f", reaped {len(reaped)}: " + ", ".join(f"{r.pid} {r.cmdline[:60]!r}" for r in reaped)
            if reaped else "",
        )
        return reaped

    # -- garbage ----------------------------------------------------------

    async def collect(self, dry_run: bool = False, grace: float | None = None) -> list[GcItem]:
        """Find (and unless ``dry_run``, remove) the root's garbage."""
        root = self.config.root
        grace = self.config.gc_grace if grace is None else grace
        findings = await trio.to_thread.run_sync(garbage.scan, root, grace)
        # Taken after the scan: a lease granted while it ran is in the table
        # by now, so its directory and processes are spared (grants happen
        # in this thread, whole, between two awaits).
        live = {*self.table.leases, *self.table.by_short}
        findings.processes = {sid: v for sid, v in findings.processes.items() if sid not in live}
        findings.bindspaces = [i for i in findings.bindspaces if Path(i.path).name not in live]
        if dry_run:
            return findings.items()
        reaped = await self.reap_victims([v for victims in findings.processes.values() for v in victims])
        process_items = [findings.process_item(r.pid, r.cmdline, r.signal) for r in reaped]
        removed = await trio.to_thread.run_sync(
            garbage.remove, root, findings.bindspaces + findings.sockets
        )
        return process_items + removed

    async def _sweep_periodically(self) -> None:
        while True:
            try:
                removed = await self.collect()
            except Exception:
                # One odd entry in the root must not stop the daemon.
                log.exception("gc sweep failed; retrying in %g s", self.config.gc_interval)
            else:
                if removed:
                    kinds = sorted({item.kind for item in removed})
                    log.info("gc sweep removed %d item(s): %s", len(removed), ", ".join(kinds))
            await trio.sleep(self.config.gc_interval)

    def _may_have_processes(self, lease: Lease) -> bool:
        """False only when no process at all was created on the host since
        the lease was granted: then none can carry its envelope, and the
        scan of every process is skipped (the common clean release).  The
        age bound keeps pid wrap-around out of the question."""
        mark = self.spawn_marks.get(lease.lease_id)
        if mark is None or time.time() - lease.record.created > 60:
            return True
        return last_pid() != mark

    async def reap(self, session_id: str, spare: Peer | None = None) -> list[Reaped]:
        """SIGINT a session's leftover processes, then SIGKILL what remains
        after the grace period."""
        victims = await self.scanner.find(session_id)
        if victims and spare is not None:
            # Looked up only now: walking the ancestry costs, and most
            # sessions leave nothing to reap.
            lineage = spare.lineage()
            victims = [v for v in victims if v.pid not in lineage]
        return await self.reap_victims(victims)

    async def reap_victims(self, victims: list[reaper.Victim]) -> list[Reaped]:
        handles = [(v, p) for v in victims if (p := Process.open(v.pid, v.start)) is not None]
        if not handles:
            return []
        killed: list[Reaped] = []
        try:
            for _, proc in handles:
                proc.send_signal(signal.SIGINT)
            with trio.move_on_after(self.config.reap_grace):
                async with trio.open_nursery() as nursery:
                    for _, proc in handles:
                        nursery.start_soon(proc.wait)
            for victim, proc in handles:
                if await proc.wait_or_timeout(0):
                    killed.append(Reaped(victim.pid, victim.cmdline, "SIGINT"))
                else:
                    proc.send_signal(signal.SIGKILL)
                    await proc.wait_or_timeout(5)
                    killed.append(Reaped(victim.pid, victim.cmdline, "SIGKILL"))
        finally:
            for _, proc in handles:
                proc.close()
        return killed


def _bind_control_socket(path: Path) -> socket.socket:
    """Bind the control socket owner-only.  Called under the daemon lock, so
    a socket file already there is a dead daemon's and safe to replace."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(socket.SOMAXCONN)
    return sock


async def _serve(daemon: Daemon, sock: socket.socket, notifier: systemd.Notifier, ready_fd: int | None) -> None:
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    def on_ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)
        notifier.send("READY=1", f"STATUS={len(daemon.table)} live leases")

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon.run, listener, on_ready)
            if notifier.watchdog_interval is not None:
                nursery.start_soon(_feed_watchdog, notifier, notifier.watchdog_interval)
            async for signum in signals:
                daemon.stopping = True
                notifier.send("STOPPING=1")
                log.info(
                    "stopping on %s; %d live leases stay on disk for the next daemon",
                    signal.Signals(signum).name, len(daemon.table),
                )
                nursery.cancel_scope.cancel()
                break


async def _feed_watchdog(notifier: systemd.Notifier, interval: float) -> None:
    while True:
        notifier.send("WATCHDOG=1")
        await trio.sleep(interval)


def _raise_fd_limit() -> None:
    """Each connection and each holder's pidfd is a file descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def serve(config: Config, ready_fd: int | None = None) -> int:
    """Run the daemon in this process until SIGTERM/SIGINT; return the exit
    status.  Under systemd, serve on the socket it passes and report
    readiness; otherwise bind ``config.socket``."""
    systemd.configure_logging()
    notifier = systemd.Notifier()
    try:
        activated = systemd.take_listen_socket()
    except RuntimeError as err:
        print(f"tractor-session serve: {err}", file=sys.stderr)
        return 1
    if activated is not None:
        config.socket = Path(activated.getsockname())
    if not paths.fits_af_unix(config.socket):
        print(f"tractor-session serve: control socket path {config.socket} is too long for AF_UNIX", file=sys.stderr)
        return 1
    try:
        paths.ensure_private_dir(config.root)
        paths.ensure_private_dir(config.socket.parent)
        # Keyed on the root, whatever the socket: one daemon per root.
        control = Path(paths.control_dir(config.root))
        paths.ensure_private_dir(control)
        lock_fd = acquire_daemon_lock(control)
        daemon = Daemon(config, notifier)
    except (AlreadyRunning, paths.UnsafePathError, PortPoolError) as err:
        print(f"tractor-session serve: {err}", file=sys.stderr)
        return 1
    _raise_fd_limit()
    # Everything the daemon creates is owner-only, without a chmod each time.
    os.umask(0o077)
    sock = activated if activated is not None else _bind_control_socket(config.socket)
    try:
        trio.run(_serve, daemon, sock, notifier, ready_fd)
    finally:
        # systemd owns an activated socket's file: it must outlive us.
        if activated is None:
            try:
                os.unlink(config.socket)
            except FileNotFoundError:
                pass
        os.close(lock_fd)
        notifier.close()
    return 0
