"""The synchronous client: how everything else talks to the daemon.

It must stay cheap to import and run because it sits on the hot path of
every test run: no trio, no psutil, no msgspec (until a typed reply or a
daemon start needs it), just a unix socket and the standard library's json.
Replies come back as plain data from :meth:`Connection.call`, or as the
protocol's typed structs from the named methods (which import msgspec on
first use).  If no daemon answers, the client starts one
(:mod:`tractor_session.autostart`), under a lock so that fifty clients
starting at once end up with one daemon.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from tractor_session import paths, wire

# Not ``typing.TYPE_CHECKING``: importing typing costs milliseconds here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypedDict, TypeVar, Unpack

    from tractor_session.protocol import (
        Bound,
        GcReport,
        Granted,
        Message,
        Released,
        Renewed,
        Status,
        Stopping,
        Transport,
    )

    R = TypeVar("R", bound=Message)
    T = TypeVar("T")

    class LeaseFields(TypedDict, total=False):
        """``protocol.LeaseRequest``'s other fields; the daemon fills in
        those not given."""

        holder_pid: int | None
        ttl: float | None
        reap: bool
        set_xdg: bool
        parent: str | None

MAX_REPLY_BYTES = 16 * 1024 * 1024
REPLY_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0
"""How long a client waits for a daemon to take its connection: for room
in a full queue of connections, or past ``busy`` replies (see
:meth:`Connection._roundtrip`)."""


_HELLO = wire.encode({"type": "hello", "version": wire.PROTOCOL_VERSION, "client": "tractor-session"})
_TIMEVAL = struct.Struct("ll")


class ClientError(RuntimeError):
    """The daemon refused a request or could not be reached.  ``code`` is
    the daemon's stable error code, or one of the client's own:
    ``"unreachable"``, ``"no-daemon"``, ``"protocol"`` (the reply made no
    sense) and ``"bad-request"`` (refused before it was sent)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Connection:
    """One connection to the daemon.  Leases taken without a holder pid
    live exactly as long as it stays open.

    ``spawned``: this client started the daemon (on demand) and has not
    had an answer yet.  If that first request fails (a lease refused, a
    bad request), the daemon was started for nothing, so the client asks
    it to stop *if idle*: only when it holds no lease and no other client
    is connected (another one may have started using it meanwhile).  The
    daemon decides, atomically, rather than a client guessing; a client
    killed before it could ask leaves the daemon to ``--exit-when-idle``.
    """

    def __init__(self, sock: socket.socket, path: str) -> None:
        self.sock = sock
        self.path = path
        self._buf = bytearray()
        # The Hello goes out with the first request and its Welcome is read
        # before that request's reply: one round trip saved per connection.
        self._hello: bytes | None = _HELLO
        self._daemon_pid = 0
        self._daemon_version = ""
        self.spawned = False
        # The leases granted bound to this connection and not released on
        # it: while any is, it is never silently replaced (see _roundtrip).
        self._bound_leases: set[str] = set()

    @property
    def bound(self) -> bool:
        """Whether a lease bound to this connection may still live."""
        return bool(self._bound_leases)

    def daemon_pid(self) -> int:
        """The daemon's pid (says hello first if no request has yet)."""
        self._say_hello()
        return self._daemon_pid

    def daemon_version(self) -> str:
        """The daemon's package version; empty from a daemon too old to say."""
        self._say_hello()
        return self._daemon_version

    def _say_hello(self) -> None:
        if self._hello is not None:
            try:
                self._roundtrip(b"")
            except OSError as err:
                raise ClientError("unreachable", f"the daemon did not answer: {err}") from None
            except wire.ProtocolError as err:
                raise ClientError("protocol", str(err)) from None

    def _roundtrip(self, request: bytes) -> bytes:
        """Send ``request`` (framed; empty: only the Hello); return the reply's body.

        A daemon at its connection limit answers ``busy`` having read
        nothing of ours, and may close a connection that holds no lease; so
        a refused request, or one that finds a connection without a lease
        closed, is sent again on a new connection, for CONNECT_TIMEOUT."""
        deadline = time.monotonic() + CONNECT_TIMEOUT
        delay = 0.005
        reconnect = False
        while True:
            try:
                if reconnect:  # within the one deadline; a busy here is retried too
                    self._reconnect(deadline - time.monotonic())
                if self._hello is not None:
                    self._handshake(request)
                    if not request:
                        return b""
                else:
                    self.sock.sendall(request)
                body = self._receive_body()
                if not (body.startswith(b'{"type":"error"') and (reply := wire.decode(body)).get("code") == "busy"):
                    return body
                refused = ClientError("busy", str(reply.get("message")))
            except ClientError as err:  # the first reply on a new connection
                if err.code != "busy":
                    raise
                refused = err
            except BrokenPipeError as err:  # the daemon had closed it: nothing read
                if self.bound:
                    raise
                refused = ClientError("unreachable", f"the daemon closed the connection: {err}")
            if time.monotonic() + delay > deadline:
                raise refused
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
            reconnect = True

    def _reconnect(self, timeout: float) -> None:
        sock = open_socket(self.path, timeout)
        if sock is None:
            raise ClientError("unreachable", f"the daemon no longer answers at {self.path}")
        self.sock.close()
        self.sock, self._buf, self._hello = sock, bytearray(), _HELLO

    def _handshake(self, request: bytes) -> None:
        assert self._hello is not None
        self.sock.sendall(self._hello + request)
        self._hello = None
        welcome = _checked(wire.decode(self._receive_body()), "welcome")
        pid, version = welcome.get("daemon_pid"), welcome.get("daemon_version", "")
        if not isinstance(pid, int) or not isinstance(version, str):
            raise ClientError("protocol", f"malformed welcome from the daemon: {welcome!r:.200}")
        self._daemon_pid, self._daemon_version = pid, version

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _receive_body(self) -> bytes:
        while (body := wire.take_frame(self._buf, MAX_REPLY_BYTES)) is None:
            data = self.sock.recv(65536)
            if not data:
                raise ClientError("unreachable", "the daemon closed the connection")
            self._buf += data
        return body

    def _exchange(self, request: dict[str, Any], decode: Callable[[bytes], T]) -> T:
        """Send ``request`` and return the daemon's reply, read by ``decode``."""
        try:
            data = wire.encode(request)
        except (TypeError, ValueError) as err:
            raise ClientError("bad-request", f"cannot send {request.get('type')!r} request: {err}") from None
        try:
            body = self._roundtrip(data)
            self._track_bound(request, body)
            return decode(body)
        except OSError as err:
            raise ClientError("unreachable", f"lost the connection to the daemon: {err}") from None
        except wire.ProtocolError as err:
            raise ClientError("protocol", str(err)) from None

    def _track_bound(self, request: dict[str, Any], body: bytes) -> None:
        """Note a lease granted bound to this connection, or released on it."""
        kind = request.get("type")
        if kind == "lease" and request.get("holder_pid") is None and body.startswith(b'{"type":"granted"'):
            lease = wire.decode(body).get("lease")
            if isinstance(lease, dict):
                self._bound_leases.add(str(lease.get("lease_id")))
        elif kind == "release" and body.startswith(b'{"type":"released"'):
            self._bound_leases.discard(str(wire.decode(body).get("lease_id")))

    def call(self, request: dict[str, Any], expected: str | None = None) -> dict[str, Any]:
        """Send ``request`` (a message as plain data) and return the reply
        as plain data.  An error reply, or one that is not of the
        ``expected`` type, raises :class:`ClientError`."""
        try:
            reply = _checked(self._exchange(request, wire.decode), expected)
        except ClientError as err:
            self._failed(err)
            raise
        self.spawned = False
        return reply

    def _ask(self, request: dict[str, Any], expected: type[R]) -> R:
        """Like :meth:`call`, with the reply decoded straight into its struct."""
        from tractor_session import protocol

        try:
            reply = self._exchange(request, protocol.decode_reply)
            if isinstance(reply, protocol.Error):
                raise ClientError(reply.code, reply.message)
            if not isinstance(reply, expected):
                raise ClientError("protocol", f"the daemon answered {request['type']!r} with {type(reply).__name__}")
        except ClientError as err:
            self._failed(err)
            raise
        self.spawned = False
        return reply

    def _failed(self, err: ClientError) -> None:
        """A request failed: if it was the first to a daemon this client
        started, ask that daemon to stop if idle (see the class docstring).
        Not when the connection itself is broken or out of step."""
        if self.spawned:
            self.spawned = False
            if err.code not in ("unreachable", "protocol"):
                try:
                    self._exchange({"type": "stop", "if_idle": True}, wire.decode)
                except ClientError:
                    pass  # best effort: --exit-when-idle ends it later anyway

    def lease(self, transport: Transport = "tcp", **fields: Unpack[LeaseFields]) -> Granted:
        from tractor_session.protocol import Granted

        return self._ask({"type": "lease", "transport": transport, **fields}, Granted)

    def release(self, lease_id: str) -> Released:
        from tractor_session.protocol import Released

        return self._ask({"type": "release", "lease_id": lease_id}, Released)

    def renew(self, lease_id: str, ttl: float | None = None) -> Renewed:
        from tractor_session.protocol import Renewed

        return self._ask({"type": "renew", "lease_id": lease_id, "ttl": ttl}, Renewed)

    def bind(self, lease_id: str, pid: int) -> Bound:
        from tractor_session.protocol import Bound

        return self._ask({"type": "bind", "lease_id": lease_id, "pid": pid}, Bound)

    def gc(self, dry_run: bool = False, grace: float | None = None) -> GcReport:
        from tractor_session.protocol import GcReport

        return self._ask({"type": "gc", "dry_run": dry_run, "grace": grace}, GcReport)

    def status(self, lease_id: str | None = None) -> Status:
        from tractor_session.protocol import Status

        return self._ask({"type": "status", "lease_id": lease_id}, Status)

    def stop(self) -> Stopping:
        """Ask the daemon to stop as SIGTERM stops it (its live leases stay
        on disk for the next daemon).  It answers first, then exits:
        :func:`tractor_session.autostart.wait_for_daemon_exit` waits for that."""
        from tractor_session.protocol import Stopping

        return self._ask({"type": "stop"}, Stopping)


def grant(conn: Connection, request: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Take a lease over ``conn`` in plain data (no msgspec: the hot path of
    ``lease``): the lease as the daemon describes it, and the environment it
    gives the session.  Checked here, since nothing typed reads them: the
    environment must be one a process can be given."""
    granted = conn.call({"type": "lease", **request}, "granted")
    lease, env = granted.get("lease"), granted.get("env")
    if not (
        isinstance(lease, dict) and isinstance(lease.get("lease_id"), str)
        and isinstance(env, dict) and all(map(_is_env_entry, env.items()))
    ):
        raise ClientError("protocol", f"malformed reply to a lease from the daemon: {granted!r:.200}")
    return lease, env


def _is_env_entry(item: tuple[object, object]) -> bool:
    name, value = item
    if not (isinstance(name, str) and isinstance(value, str) and name):
        return False
    if "=" in name or "\0" in name or "\0" in value:
        return False
    try:
        (name + value).encode()  # a lone surrogate cannot reach a process
    except UnicodeEncodeError:
        return False
    return True


def release_plain(conn: Connection, lease_id: str) -> dict[str, Any] | None:
    """Release in plain data, reconnecting once if the daemon was restarted
    meanwhile; None when the lease had already ended.  Closes ``conn``.

    Raises :class:`ClientError` with code ``"ended"`` when the daemon
    ended the lease on its own first (released by another client, ttl,
    parent ended): the message says why."""
    release = {"type": "release", "lease_id": lease_id}
    try:
        return conn.call(release, "released")
    except ClientError as err:
        if err.code == "ended":
            raise
        if err.code != "unreachable":
            return None
    finally:
        conn.close()
    try:
        with connect() as fresh:
            return fresh.call(release, "released")
    except ClientError as err:
        if err.code == "ended":
            raise
        return None  # the new daemon did not adopt it, or ended it before knowing why


def _checked(reply: dict[str, Any], expected: str | None = None) -> dict[str, Any]:
    """``reply``, unless it is an error (raised) or not the ``expected`` type."""
    if reply["type"] == "error":
        code, message = reply.get("code"), reply.get("message")
        if not (isinstance(code, str) and isinstance(message, str)):
            raise ClientError("protocol", f"malformed error reply from the daemon: {reply!r:.200}")
        raise ClientError(code, message)
    if expected is not None and reply["type"] != expected:
        raise ClientError("protocol", f"expected {expected!r} from the daemon, got {reply['type']!r:.80}")
    return reply


def try_connect(path: str) -> Connection | None:
    """A connection to the daemon at ``path``, or None if none listens there."""
    if (too_long := paths.socket_too_long(path)) is not None:
        raise ClientError("unreachable", too_long)
    sock = open_socket(path)
    return None if sock is None else Connection(sock, path)


def open_socket(path: str, timeout: float = CONNECT_TIMEOUT) -> socket.socket | None:
    """A socket connected to ``path`` (within ``timeout``), or None if nothing listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # A blocking connect waits for room in a full queue of connections for
    # at most the send timeout; with a socket timeout it fails at once.
    usec = max(1000, int(timeout * 1e6))  # a zero timeval would mean "forever"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.pack(usec // 1_000_000, usec % 1_000_000))
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except BlockingIOError:
        sock.close()
        raise ClientError(
            "busy", f"the daemon at {path} took no new connection for {timeout:.3g} s (its queue stayed full); retry",
        ) from None
    except OSError as err:
        sock.close()
        raise ClientError("unreachable", f"cannot connect to {path}: {err}") from None
    # Long enough for a release that waits out a reap grace period; short
    # enough that a wedged daemon gives an error instead of a hang.
    sock.settimeout(REPLY_TIMEOUT)
    return sock


def connect(autostart: bool = True, environ: dict[str, str] | None = None) -> Connection:
    """Connect to this user's daemon, starting one if none answers."""
    env = dict(os.environ if environ is None else environ)
    sock_path = paths.control_socket(env)
    if os.path.lexists(control := os.path.dirname(sock_path) or "."):
        # Someone who can swap this directory could impersonate the daemon.
        paths.check_private_dir(control)
    if (conn := try_connect(sock_path)) is not None:
        return conn
    from tractor_session import autostart as on_demand

    if autostart:
        return on_demand.start_daemon(sock_path, env)
    root = paths.runtime_root(env)
    if (conn := on_demand.reach_headless_daemon(root, sock_path, on_demand.DAEMON_START_TIMEOUT)) is not None:
        return conn
    raise ClientError("no-daemon", f"no tractor-session daemon runs at {sock_path}")

