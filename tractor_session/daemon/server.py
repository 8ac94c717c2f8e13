"""Connections: who may talk to the daemon, and how a request is read.

One trio task serves each connection.  It checks the peer's uid before
anything else, reads length-prefixed frames under a size limit and two
clocks, insists on a matching protocol version, and hands each request to
:class:`~tractor_session.daemon.sessions.Sessions`.  Every failure costs
one connection, never the daemon: a malformed frame closes it with a
``protocol`` error, a bug with an ``internal`` one.

Leases taken without a holder pid are bound to the connection that took
them and end when it closes.

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


class Server:
    def __init__(self, config: Config, sessions: Sessions, lifetime: Lifetime) -> None:
        self.config = config
        self.sessions = sessions
        self.lifetime = lifetime
        self.connections = 0

    def idle(self, own: int = 0) -> bool:
        """No live lease, and no connection open but ``own`` of them."""
        return self.connections <= own and not self.sessions.table

    async def serve(self, control: ControlSocket) -> None:
        """Serve every connection until cancelled.  They run in a nursery of
        their own: binding the control socket again leaves them alone."""
        async with trio.open_nursery() as connections:
            await control.serve(self._serve_connection, connections)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        held: list[Lease] = []
        self.connections += 1
        self.lifetime.changed()
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
            self.lifetime.changed()
            await stream.aclose()
            for lease in held:
                self.sessions.connection_closed(lease)

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
