"""Connections: who may talk to the daemon, and how a request is read.

A peer of another uid is refused as it is accepted, with no task of its
own.  One trio task serves each other connection: it reads
length-prefixed frames under a size limit and two clocks, insists on a matching protocol version, and hands each request to
:class:`~tractor_session.daemon.sessions.Sessions`.  Every failure costs
one connection, never the daemon: a malformed frame closes it with a
``protocol`` error, a bug with an ``internal`` one.

Leases taken without a holder pid are bound to the connection that took
them and end when it closes.

At ``--max-connections``, a new connection makes room by cutting the one
that has been idle longest: waiting for a request (or for the rest of one
trickling in) while it holds no lease.  A connection that holds a lease,
or whose request is being handled, is never cut; only when every one is
like that is a new one refused.  Both get a ``busy`` error, which the
client retries within its deadline (:mod:`tractor_session.client`).
What a flood of connections can make the daemon log (refusals, cuts,
malformed requests) is logged at a bounded rate (:class:`Throttled`).

A ``stop`` request is answered first; only then is the daemon stopped
(:class:`~tractor_session.daemon.lifetime.Lifetime`), so that the client
hears it and knows which lock to wait on.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import struct
import time

import trio

import tractor_session
from tractor_session import protocol, wire
from tractor_session.daemon.config import Config
from tractor_session.daemon.control import ControlSocket
from tractor_session.daemon.holders import Peer, describe
from tractor_session.daemon.lifetime import Lifetime
from tractor_session.daemon.sessions import Sessions
from tractor_session.daemon.table import Lease, LeaseError, explain_os_error
from tractor_session.protocol import (
    Bind,
    Error,
    GcReport,
    GcRequest,
    Granted,
    Hello,
    LeaseRequest,
    Release,
    Renew,
    ShowRequest,
    StatusRequest,
    Stop,
    Stopping,
    Welcome,
)
from tractor_session.wire import ProtocolError

log = logging.getLogger("tractor_session.daemon")

_PEERCRED = struct.Struct("3i")
_FORBIDDEN = protocol.frame(Error("forbidden", "this daemon serves only its own user"))
LOG_INTERVAL = 10.0
"""At most one line per this many seconds for each thing a flood of
connections can make the daemon log."""


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
        if (body := wire.take_frame(self.buf, self.limit)) is not None:
            return body
        with trio.move_on_after(self.frame_timeout):
            while (body := wire.take_frame(self.buf, self.limit)) is None:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise ProtocolError("connection closed mid-message")
                self.buf += data
            return body
        raise ProtocolError(f"incomplete request after {self.frame_timeout:g} s; closing")


class Throttled:
    """A log line that clients can cause, at most once per ``interval``
    seconds: the first of a burst is logged, the others only counted, and
    their number is said with the next one logged."""

    def __init__(self, level: int, interval: float = LOG_INTERVAL) -> None:
        self.level = level
        self.interval = interval
        self._quiet_until = -math.inf
        self._held_back = 0

    def log(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._quiet_until:
            self._held_back += 1
            return
        if self._held_back:
            msg += f" (and {self._held_back} more since the last such line)"
            self._held_back = 0
        self._quiet_until = now + self.interval
        log.log(self.level, msg, *args)


class IdleCut(Exception):
    """The connection was idle and cut to make room for a new one."""


class Server:
    def __init__(self, config: Config, sessions: Sessions, lifetime: Lifetime) -> None:
        self.config = config
        self.sessions = sessions
        self.lifetime = lifetime
        self.connections = 0
        # The connections that may be cut, longest idle first (see the
        # module docstring): their reads' cancel scopes.
        self._idle: dict[trio.CancelScope, None] = {}
        self._connections: trio.Nursery  # set by serve()
        self._foreign = Throttled(logging.WARNING)
        self._busy = Throttled(logging.WARNING)
        self._cut = Throttled(logging.INFO)
        self._dropped = Throttled(logging.INFO)

    def idle(self, own: int = 0) -> bool:
        """No live lease, and no connection open but ``own`` of them."""
        return self.connections <= own and not self.sessions.table

    async def serve(self, control: ControlSocket) -> None:
        """Serve every connection until cancelled.  They run in a nursery of
        their own: binding the control socket again leaves them alone."""
        async with trio.open_nursery() as connections:
            self._connections = connections
            await control.serve(self._accepted)

    def _accepted(self, stream: trio.SocketStream) -> None:
        """A new connection, in the accept loop.  Another user's is refused
        there and then, with no task and no wait, so that a flood of them is
        turned away as fast as it comes; ours gets a task."""
        try:
            pid, uid = peer_credentials(stream.socket)
        except OSError:
            stream.socket.close()
            return
        if uid != os.getuid():
            self._foreign.log("refused a connection from uid %d (pid %d): not our user", uid, pid)
            try:
                # Non-blocking: a last word if there is room for it.
                os.write(stream.socket.fileno(), _FORBIDDEN)
            except OSError:
                pass
            stream.socket.close()
            return
        self._connections.start_soon(self._serve_connection, stream, pid)

    async def _serve_connection(self, stream: trio.SocketStream, pid: int) -> None:
        held: list[Lease] = []
        self.connections += 1
        self.lifetime.changed()
        try:
            if self.connections > self.config.max_connections and not self._cut_longest_idle():
                limit = self.config.max_connections
                self._busy.log("refused a connection: all %d (--max-connections) hold leases or are being served", limit)
                await self._send(stream, Error(
                    "busy", f"the daemon has {limit} connections open (its limit), none idle; retry shortly",
                ))
                return
            reader = FrameReader(stream, self.config.max_message_bytes, self.config.request_timeout)
            await self._converse(stream, reader, Peer(pid), held)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except IdleCut:
            await self._send(stream, Error(
                "busy", f"the daemon is at its limit of {self.config.max_connections} connections"
                " and closed this idle one to make room; reconnect",
            ))
        except ProtocolError as err:
            self._dropped.log("dropping a client: %s", err)
            await self._send(stream, Error("protocol", str(err)))
        except Exception as err:
            # A bug must cost one connection, never the daemon and every
            # lease it holds.
            log.exception("internal error serving a client")
            await self._send(stream, Error("internal", f"the daemon hit an internal error: {err!r}; see its log"))
        finally:
            self.connections -= 1
            self.lifetime.changed()
            await stream.aclose()
            for lease in held:
                self.sessions.connection_closed(lease)

    def _cut_longest_idle(self) -> bool:
        """Cut the connection idle longest, if any is; whether one was."""
        if not self._idle:
            return False
        scope = next(iter(self._idle))
        del self._idle[scope]
        scope.cancel()
        self._cut.log("closed an idle connection to make room (--max-connections %d)", self.config.max_connections)
        return True

    async def _next_request(self, reader: FrameReader, held: list[Lease], timeout: float) -> bytes | None:
        """The next request's body (None at the end of the stream).  While
        the connection holds no lease, the wait may be cut (:class:`IdleCut`)."""
        # Leases ended elsewhere (another client's release, a parent's end)
        # no longer keep this connection: else it could never be cut.
        held[:] = [lease for lease in held if not lease.ended]
        if held:
            return await reader.read(math.inf)
        scope = trio.CancelScope()
        self._idle[scope] = None
        try:
            with scope:
                return await reader.read(timeout)
            raise IdleCut
        finally:
            self._idle.pop(scope, None)

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
        body = await self._next_request(reader, held, self.config.request_timeout)
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
                " daemon (`tractor-session stop`, or `kill` it) so that a matching one starts, or upgrade.",
            ))
            return
        welcome = protocol.frame(Welcome(wire.PROTOCOL_VERSION, os.getpid(), tractor_session.__version__))
        if not reader.buf:
            await stream.send_all(welcome)
            welcome = b""
        # else the client sent its first request right behind the Hello:
        # the Welcome goes out with its reply, one wake-up of the client
        # instead of two.
        while True:
            body = await self._next_request(reader, held, self.config.idle_timeout)
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
            if isinstance(reply, Stopping) and reply.stopping:
                self.lifetime.stop(f"at the request of {describe(peer.pid)}" if peer.pid > 0 else "on request")
                return

    async def _handle(self, request: protocol.Message, peer: Peer, held: list[Lease]) -> protocol.Message:
        sessions = self.sessions
        match request:
            case LeaseRequest():
                lease = await sessions.grant(request, peer)
                if request.holder_pid is None:
                    held.append(lease)
                return Granted(lease.info(), lease.record.env)
            case Release(lease_id=lease_id):
                lease = sessions.find(lease_id)
                by_holder = lease in held
                if by_holder:
                    held.remove(lease)
                return await sessions.release(lease, peer, by_holder)
            case Renew(lease_id=lease_id, ttl=ttl):
                return sessions.renew(sessions.find(lease_id), ttl)
            case Bind(lease_id=lease_id, pid=pid):
                return sessions.bind(sessions.find(lease_id), pid)
            case StatusRequest(lease_id=lease_id):
                return sessions.status(lease_id)
            case ShowRequest(lease_id=lease_id):
                return await sessions.show(lease_id)
            case Stop(if_idle=if_idle):
                # An if_idle stop: nothing may be in use but the asker's connection.
                stopping = not if_idle or self.idle(own=1)
                return Stopping(os.getpid(), str(self.config.root), len(sessions.table), stopping)
            case GcRequest(dry_run=dry_run, grace=grace):
                if grace is not None and not 0 <= grace < 10**9:
                    raise LeaseError("bad-request", f"grace must be a non-negative number of seconds, not {grace}")
                return GcReport(dry_run, await sessions.collect(dry_run, grace))
            case Hello():
                raise ProtocolError("hello sent twice")
        raise ProtocolError(f"unsupported request {type(request).__name__}")
