"""The control protocol's messages: the schema both ends agree on.

Every message is a msgspec struct, tagged by its ``"type"`` field and sent
as JSON (framing: :mod:`tractor_session.wire`).  A connection opens with
:class:`Hello`, so that a client and a daemon of different protocol versions
fail with a clear error instead of misreading each other.  The client may
send its first request right behind its Hello without waiting for
:class:`Welcome`: one round trip, not two.

The daemon decodes every request strictly against these structs.  The
client sends its requests as plain data and decodes a reply into these
structs only for callers that ask for typed replies, so that ``lease``,
on the command line, never imports msgspec.
"""

from __future__ import annotations

import re
from typing import Literal, TypeVar

import msgspec

from tractor_session import wire
from tractor_session.wire import ProtocolError

# A lease id as it appears in requests: a canonical uuid4 string, or any
# prefix of one, dashes optional (as git and docker take ids), which the
# daemon resolves to the one live lease it names.  Checked before any id
# reaches the lease table.
LEASE_ID_RE = re.compile(r"[0-9a-f][0-9a-f-]{0,35}")

Transport = Literal["tcp", "uds"]
Net = Literal["host", "private"]


class BadIdError(ValueError):
    """A lease id that is not a uuid or a prefix of one."""


def check_id(lease_id: str) -> str:
    """``lease_id`` in lower case, if it is a well-formed id or prefix."""
    if not LEASE_ID_RE.fullmatch(lowered := lease_id.lower()):
        raise BadIdError(f"{lease_id[:80]!r} is not a lease id (a uuid, or its first hex digits)")
    return lowered


class Message(msgspec.Struct, tag_field="type", forbid_unknown_fields=True):
    pass


# -- requests ---------------------------------------------------------------


class Hello(Message, tag="hello", forbid_unknown_fields=False):
    """Lenient on purpose: a newer client's Hello may carry more fields,
    and must still get a clear version error rather than a parse error."""

    version: int
    client: str = ""


class LeaseRequest(Message, tag="lease"):
    """Ask for a session.

    ``holder_pid``: the process whose life bounds the lease; ``None`` binds it
    to this connection instead (the lease ends when the connection closes).
    ``net``: ``"private"`` when the holder runs the session in a network
    namespace of its own; a tcp session's registry is then tractor's
    default address, which is the session's alone there.
    """

    transport: Transport = "tcp"
    holder_pid: int | None = None
    ttl: float | None = None
    reap: bool = True
    set_xdg: bool = True
    parent: str | None = None
    net: Net = "host"
    inside: str | None = None
    """The session the requester itself runs in (from its environment):
    when it is live here, the new lease becomes its child, as ``parent``."""


class Release(Message, tag="release"):
    lease_id: str


class Renew(Message, tag="renew"):
    lease_id: str
    ttl: float | None = None


class Bind(Message, tag="bind"):
    """Tell the daemon the pid of the command a connection-held lease runs,
    so that a daemon restarted mid-run can re-bind the lease to it."""

    lease_id: str
    pid: int


class StatusRequest(Message, tag="status"):
    """Every live lease, or with ``lease_id`` the one it names."""

    lease_id: str | None = None


class GcRequest(Message, tag="gc"):
    dry_run: bool = False
    grace: float | None = None


class ShowRequest(Message, tag="show"):
    """One live lease with the environment it hands out: what
    ``tractor-session exec`` runs a command with, and what ``ps`` needs to
    find the session's processes."""

    lease_id: str


class Stop(Message, tag="stop"):
    """Stop the daemon the way SIGTERM does: its live leases stay on disk
    and the next daemon re-adopts them.  ``if_idle``: only if it holds no
    lease and no client but the asker is connected; what a client that
    started a daemon sends when its first request failed."""

    if_idle: bool = False


Request = LeaseRequest | Release | Renew | Bind | StatusRequest | GcRequest | ShowRequest | Stop

# -- replies ----------------------------------------------------------------


class LeaseInfo(msgspec.Struct, forbid_unknown_fields=True):
    """A live lease as the daemon reports it."""

    lease_id: str
    bindspace: str
    transport: Transport
    registry_addr: tuple[str, int | str]
    port: int | None
    holder_pid: int | None
    created: float
    expires: float | None = None
    parent: str | None = None
    reap: bool = True
    net: Net = "host"


class Welcome(Message, tag="welcome"):
    version: int
    daemon_pid: int
    daemon_version: str = ""
    """The daemon's package version (``tractor_session.__version__``), so
    that ``tractor-session --version`` can tell an old daemon still
    running; empty from a daemon older than this field."""


class Granted(Message, tag="granted"):
    lease: LeaseInfo
    env: dict[str, str]


class Reaped(msgspec.Struct):
    pid: int
    cmdline: str
    signal: str


class Released(Message, tag="released"):
    lease_id: str
    reaped: list[Reaped] = []


class Renewed(Message, tag="renewed"):
    lease_id: str
    expires: float | None


class Bound(Message, tag="bound"):
    lease_id: str


class Status(Message, tag="status_reply"):
    daemon_pid: int
    root: str
    leases: list[LeaseInfo]


class GcItem(msgspec.Struct):
    kind: str
    path: str
    reason: str


class GcReport(Message, tag="gc_report"):
    dry_run: bool
    items: list[GcItem]


class Shown(Message, tag="shown"):
    """A live lease, its envelope, and what identifies its processes: the
    holder's start time (a pid alone may have been reused) and the inode of
    its private network namespace, once its holder has entered it."""

    lease: LeaseInfo
    env: dict[str, str]
    holder_start: float | None = None
    netns: int | None = None


class Error(Message, tag="error"):
    """A refused request.  ``code`` is stable for programs, ``message`` is
    for people and says what to do next."""

    code: str
    message: str


class Stopping(Message, tag="stopping"):
    """The answer to :class:`Stop`, sent before the daemon stops.  ``root``
    names its lock, which it holds until it has let go of everything;
    ``leases``: how many stay on disk for the next daemon; ``stopping`` is
    False when an ``if_idle`` stop found the daemon in use."""

    daemon_pid: int
    root: str
    leases: int
    stopping: bool = True


Reply = Welcome | Granted | Released | Renewed | Bound | Status | GcReport | Shown | Stopping | Error

_encoder = msgspec.json.Encoder()
_request_decoder = msgspec.json.Decoder(Hello | Request)
_reply_decoder = msgspec.json.Decoder(Reply)


def frame(msg: Message) -> bytes:
    return wire.frame(_encoder.encode(msg))


T = TypeVar("T")


def _decode(decoder: msgspec.json.Decoder[T], body: bytes, what: str) -> T:
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as err:
        raise ProtocolError(f"malformed {what}: {err}") from None
    except RecursionError:
        # msgspec recurses while skipping a deeply nested unknown field.
        raise ProtocolError(f"malformed {what}: nested too deeply") from None


def decode_request(body: bytes) -> Hello | Request:
    return _decode(_request_decoder, body, "request")


def decode_reply(body: bytes) -> Reply:
    return _decode(_reply_decoder, body, "reply from the daemon")
