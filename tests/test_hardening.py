"""Hostile input, and the daemon stays up: protocol garbage, a wrong
protocol version, fuzzed frames (the request decoder, the envelope loader,
a live daemon), hostile numbers and ids, deep nesting; and, the other way
round, a "daemon" that answers nonsense to the client and the CLI.

(The file keeps its old name because ``scripts/fuzz.py`` runs its ``fuzz``
tests by path, for longer runs than CI's.  Resource limits and exhaustion
are in ``test_limits.py``; who may connect, and which directories are
trusted, in ``test_permissions.py``.)

Real daemon processes over real unix sockets; nothing of ours is mocked.
Each daemon logs to a file of its own where a test reads its log (so a
chatty daemon can never block on a full stderr pipe), every wait is a
deadline (``wait_for`` or a socket timeout), and every process is killed at
teardown by the ``runtime`` fixture.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import socket
import stat
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import (
    DEADLINE,
    HELLO,
    Runtime,
    assert_served,
    client_error,
    exchange,
    hold,
    pid_alive,
    raw_connect,
    raw_frame,
    read_to_eof,
    split_frames,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tractor_session import envelope, protocol
from tractor_session.protocol import (
    Bind,
    Error,
    GcRequest,
    Hello,
    LeaseRequest,
    Release,
    Renew,
    StatusRequest,
    Welcome,
    decode_request,
    frame,
)
from tractor_session.wire import HEADER, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, ProtocolError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and SO_PEERCRED")

HEX12_RE = re.compile(r"[0-9a-f]{12}")


def assert_one_exchange(replies: list[protocol.Reply]) -> None:
    """The replies to a pipelined Hello + one request: the Welcome and the
    reply, or a lone Error when the daemon gave up before welcoming (it
    sends the Welcome together with the first reply)."""
    assert replies, "the daemon hung up without a word"
    if isinstance(replies[0], Welcome):
        assert len(replies) <= 2 and not any(isinstance(r, Welcome) for r in replies[1:]), replies
    else:
        assert len(replies) == 1 and isinstance(replies[0], Error), replies


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



# -- protocol garbage and versions -------------------------------------------------


GARBAGE = {
    "random-bytes": (random.Random(2).randbytes(512), True),
    "oversized-length-prefix": (b"\xff\xff\xff\xff", False),
    "undecodable-body": (raw_frame(b"\xc1" * 16), False),
    "truncated-frame": (HEADER.pack(100) + b"x" * 10, True),
    "request-before-hello": (frame(StatusRequest()), False),
    "unknown-message-type": (
        frame(Hello(version=PROTOCOL_VERSION)) + raw_frame(msgspec.json.encode({"type": "launch_missiles", "n": 1})),
        False,
    ),
    "hello-twice": (frame(Hello(version=PROTOCOL_VERSION)) * 2, False),
    # JSON cannot carry an infinite ttl; a number past a double's range is
    # the nearest a client can send.
    "out-of-range-number": (
        frame(Hello(version=PROTOCOL_VERSION)) + raw_frame(b'{"type":"lease","transport":"uds","ttl":1e999}'),
        False,
    ),
}


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_protocol_garbage_is_refused_and_the_daemon_keeps_serving(runtime: Runtime, daemon, kind: str) -> None:
    before = hold(runtime)  # a client in the middle of its lease
    data, shut_wr = GARBAGE[kind]

    replies = exchange(runtime, data, shut_wr=shut_wr)
    welcomes = [r for r in replies if isinstance(r, Welcome)]
    errors = [r for r in replies if isinstance(r, Error)]
    assert len(welcomes) + len(errors) == len(replies), replies
    if kind in ("unknown-message-type", "hello-twice"):
        assert len(welcomes) == 1
    if kind != "random-bytes":  # random bytes: an error reply or a plain close
        assert [e.code for e in errors] == ["protocol"], replies
        assert errors[0].message

    assert pid_alive(daemon.pid)
    res = runtime.cli("lease", "--", "true")
    assert res.returncode == 0, res.stderr
    assert before.bindspace.is_dir()  # the other client's lease is intact
    assert before.finish() == 0
    assert runtime.bindspaces() == []


def test_wrong_protocol_version_gets_a_version_error_not_a_hang(runtime: Runtime, daemon) -> None:
    replies = exchange(runtime, frame(Hello(version=PROTOCOL_VERSION + 1)), shut_wr=False)
    assert len(replies) == 1 and isinstance(replies[0], Error), replies
    assert replies[0].code == "version"
    assert str(PROTOCOL_VERSION + 1) in replies[0].message
    assert str(PROTOCOL_VERSION) in replies[0].message
    assert runtime.cli("lease", "--", "true").returncode == 0


def test_newer_client_hello_with_extra_fields_gets_a_version_error(runtime: Runtime, daemon) -> None:
    body = msgspec.json.encode(
        {"type": "hello", "version": PROTOCOL_VERSION + 1, "client": "tractor-session", "features": ["x"]}
    )
    replies = exchange(runtime, raw_frame(body), shut_wr=False)
    assert len(replies) == 1 and isinstance(replies[0], Error), replies
    assert replies[0].code == "version", replies[0]



# -- fuzzing and hostile values ----------------------------------------------------


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
        raise AssertionError("unreachable") from None


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
    daemon = runtime.start_daemon(log=log)
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
    runtime.start_daemon(log=tmp_path / "daemon.log")
    with runtime.connect() as conn:
        held = conn.lease("uds")
        for what, make, codes in HOSTILE_VALUES:
            err = client_error(lambda: conn.call(msgspec.to_builtins(make(held.lease.lease_id))))
            assert err.code in codes, (what, err)
            assert [lease.lease_id for lease in conn.status().leases] == [held.lease.lease_id], what
        conn.release(held.lease.lease_id)
    assert os.listdir(runtime.root) == []


def test_hostile_parent_id_is_validated_and_not_echoed(runtime: Runtime, tmp_path: Path) -> None:
    runtime.start_daemon(log=tmp_path / "daemon.log")
    with runtime.connect() as conn:
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
    runtime.start_daemon(log=tmp_path / "daemon.log")
    sentinel = runtime.base / "sentinel"
    sentinel.mkdir()
    (sentinel / "a").write_text("keep me")
    before = tree_snapshot(runtime.base / "sentinel")
    with runtime.connect() as conn:
        held = conn.lease("uds")
        for lease_id in HOSTILE_IDS:
            err = client_error(lambda: conn.call(msgspec.to_builtins(make(lease_id))))
            # Hex digits and dashes are a prefix of some id: just not a live one.
            id_like = re.fullmatch(r"[0-9a-fA-F][0-9a-fA-F-]{0,35}", lease_id)
            assert err.code == ("unknown-lease" if id_like else "bad-request"), (lease_id[:40], err)
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
    daemon = runtime.start_daemon(log=log)
    with runtime.connect() as good:
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
        err = client_error(lambda: runtime.connect().lease())
    assert res.returncode == 1, res
    assert res.stderr.startswith("tractor-session: ") and "Traceback" not in res.stderr, res.stderr
    assert not marker.exists(), "the command ran without a session"
    assert err.code == BAD_REPLIES[name][1], err
