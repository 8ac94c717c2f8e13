"""How messages travel between a client and the daemon.

A message is a JSON object with a ``"type"`` field, sent as a 4-byte
big-endian length and the UTF-8 body.  JSON rather than a binary format
because the client must not import msgspec: msgspec alone costs more than
a bare interpreter start (it imports ``typing``, ``uuid``, ``decimal`` and
``datetime``), and the client runs on the hot path of every test run.  The
standard library's ``json`` reads and writes these few small messages in
microseconds.  The daemon decodes the same bytes strictly with msgspec,
against the schema in :mod:`tractor_session.protocol`.
"""

from __future__ import annotations

import json
import struct

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
HEADER = struct.Struct(">I")


# What JSON cannot carry is refused here rather than by the daemon, which
# would drop the connection: a NaN or infinite float, a string that is not
# valid unicode (ValueError, at ``.encode()``).
_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class ProtocolError(RuntimeError):
    """The peer sent something that is not a valid message."""


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def take_frame(buf: bytearray, limit: int = MAX_MESSAGE_BYTES) -> bytes | None:
    """The body of the first whole frame in ``buf``, removed from it, or
    None while the frame is still incomplete.  Raises :class:`ProtocolError`
    as soon as the header announces more than ``limit`` bytes."""
    if len(buf) < HEADER.size:
        return None
    (length,) = HEADER.unpack(buf[: HEADER.size])
    if length > limit:
        raise ProtocolError(f"message of {length} bytes exceeds the {limit}-byte limit")
    end = HEADER.size + length
    if len(buf) < end:
        return None
    body = bytes(buf[HEADER.size : end])
    del buf[:end]
    return body


def encode(message: dict[str, object]) -> bytes:
    """A framed message.  Raises ValueError for what JSON cannot carry, and
    TypeError for what is not plain data."""
    return frame(_encoder.encode(message).encode())


def decode(body: bytes) -> dict[str, object]:
    """A message as plain data; its fields are checked by whoever reads them.
    As strict as the daemon's decoder: UTF-8 only, no NaN or Infinity."""
    try:
        message = json.loads(body.decode(), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as err:
        # ValueError: not UTF-8, not JSON, a constant, or an integer too long
        # to convert.
        raise ProtocolError(f"malformed message: {err}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("malformed message: not an object with a string 'type'")
    return message
