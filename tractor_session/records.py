"""The on-disk lease record, and the one way a bindspace is removed.

Each lease is recorded in its own bindspace (:data:`RECORD_NAME`), written
to a temporary file and renamed into place, so a daemon killed at any
instant leaves either the old record or the new one.  A directory and its
record are one unit: a restarted daemon re-adopts a lease by reading the
records it finds, and garbage collection judges a directory by its record
(or, without one, by its age).
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
import stat
from pathlib import Path

import msgspec

from tractor_session.paths import BINDSPACE_NAME_LEN, LEGACY_BINDSPACE_NAME_LEN, bindspace_names
from tractor_session.protocol import Net, Transport

RECORD_NAME = ".tractor-session-lease"
QUARANTINED_NAME = RECORD_NAME + ".bad"
"""Where a record no daemon may adopt is renamed to (:func:`quarantine`)."""
BINDSPACE_NAME_RE = re.compile(rf"[0-9a-f]{{{BINDSPACE_NAME_LEN}}}|[0-9a-f]{{{LEGACY_BINDSPACE_NAME_LEN}}}")
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class BadRecord(ValueError):
    """A record that parses but cannot be true: never adopted (the message
    says what is wrong with it)."""


class LeaseRecord(msgspec.Struct, forbid_unknown_fields=False):
    """What a restarted daemon needs to take a lease over."""

    lease_id: str
    bindspace: str
    transport: Transport
    port: int | None
    env: dict[str, str]
    created: float
    # The process whose life bounds the lease, identified by pid *and*
    # start time so that a reused pid never keeps a dead holder's lease.
    # For a lease bound to a client connection (``lease --``) this is the
    # client, then (after a Bind) its command: a restarted daemon, which
    # no longer has the connection, watches this pid instead.
    holder_pid: int | None
    holder_start: float | None
    ttl: float | None = None
    expires: float | None = None
    reap: bool = True
    parent: str | None = None
    net: Net = "host"
    # The session's private network namespace (its inode), once its holder
    # has entered it: every process in it belongs to the session.
    netns: int | None = None
    # The ``lease -- CMD`` process that holds the lease on its connection,
    # once it has bound the lease to CMD (then ``holder_pid``): its death is
    # what ends the session, so a restarted daemon, which no longer has the
    # connection, watches it (pid and start time, as the holder's).
    runner_pid: int | None = None
    runner_start: float | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(LeaseRecord)


def _problem(record: LeaseRecord) -> str | None:
    """What makes ``record`` impossible, or None.  Records are hostile
    input: whatever a daemon adopts it trusts (ports it frees, parents it
    follows, pids it watches)."""
    if not _UUID_RE.fullmatch(record.lease_id):
        return f"lease_id {record.lease_id[:80]!r} is not a lease id"
    if (record.transport == "tcp" and record.net == "host") != (record.port is not None):
        return f"port {record.port} does not go with transport {record.transport!r} and net {record.net!r}"
    if record.port is not None and not 0 < record.port < 65536:
        return f"port {record.port} is not a port"
    for name in ("holder", "runner"):
        pid, start = getattr(record, f"{name}_pid"), getattr(record, f"{name}_start")
        if pid is not None and pid <= 0:  # 1 may be: a client that is its container's init
            return f"{name} pid {pid} is not a process"
        if start is not None and not math.isfinite(start):
            return f"{name} start time {start} is not a time"
    if record.runner_pid is not None and record.holder_pid is None:
        return "it has a runner but no holder"
    if not math.isfinite(record.created):
        return f"created {record.created} is not a time"
    if record.ttl is not None and not 0 < record.ttl < 10**9:
        return f"ttl {record.ttl} is out of range"
    if record.expires is not None and not math.isfinite(record.expires):
        return f"expires {record.expires} is not a time"
    if record.parent is not None and not _UUID_RE.fullmatch(record.parent):
        return f"parent {record.parent[:80]!r} is not a lease id"
    if record.parent == record.lease_id:
        return "it is its own parent"
    return None


def create_record(record: LeaseRecord) -> None:
    """Write the first record of a brand-new bindspace.

    No temporary file is needed: a crash mid-write leaves a record that does
    not parse, which counts as no record, the state before the write.
    """
    _write_file(f"{record.bindspace}/{RECORD_NAME}", record, os.O_EXCL)


def write_record(record: LeaseRecord) -> None:
    """Atomically rewrite a lease's record inside its bindspace."""
    path = f"{record.bindspace}/{RECORD_NAME}"
    tmp = f"{path}.{os.getpid()}.tmp"
    _write_file(tmp, record, os.O_TRUNC)
    os.replace(tmp, path)


def _write_file(path: str, record: LeaseRecord, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | mode, 0o600)
    try:
        os.write(fd, _encoder.encode(record))
    finally:
        os.close(fd)


def read_record(bindspace: Path) -> LeaseRecord | None:
    """The record in ``bindspace``, or None if there is none (or only
    something that is not its record: not a regular file, a write cut
    short, another directory's).  Raises :class:`BadRecord` for a record that parses but cannot
    be true, and ``OSError`` when it cannot tell, so that no one mistakes a
    live lease for garbage."""
    try:
        # O_NONBLOCK: a FIFO planted under the record's name must not hang us.
        fd = os.open(bindspace / RECORD_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:  # a symlink in the record's place
            return None
        raise  # cannot tell (out of fds, say): callers keep the directory
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, 1 << 20)
    finally:
        os.close(fd)
    try:
        record = _decoder.decode(data)
    except msgspec.ValidationError as err:  # well-formed, but not a record
        raise BadRecord(str(err)) from None
    except msgspec.DecodeError:
        return None
    # A record only counts for the directory it sits in (one copied or
    # moved, or read through another spelling of the root, is none here).
    if Path(record.bindspace) != bindspace or bindspace.name not in bindspace_names(record.lease_id):
        return None
    if (problem := _problem(record)) is not None:
        raise BadRecord(problem)
    return record


def quarantine(bindspace: str) -> None:
    """Rename a bindspace's record aside (:data:`QUARANTINED_NAME`): no
    daemon adopts it again, people can read it, and garbage collection
    judges the directory as one without a record, by its age."""
    os.rename(f"{bindspace}/{RECORD_NAME}", f"{bindspace}/{QUARANTINED_NAME}")


def remove_bindspace(root: str, bindspace: str) -> None:
    """Remove a session directory without ever following a symlink.

    The one remover, for a lease's end and for garbage collection alike.
    ``shutil.rmtree`` works through directory fds on Linux and the BSDs,
    so a link swapped in mid-removal cannot send it outside the tree.
    (Plain strings, not pathlib: this runs for every lease.)
    """
    parent, _, name = bindspace.rpartition("/")
    if parent != root or not BINDSPACE_NAME_RE.fullmatch(name):
        raise ValueError(f"refusing to remove {bindspace}: not a bindspace of {root}")
    try:
        st = os.lstat(bindspace)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(bindspace)
        return
    # The common case, a session that left nothing, in three syscalls that
    # need no file descriptor (a grant failing for want of fds must still
    # clean up); anything else (sockets, links, files) goes through rmtree.
    for remove, path in ((os.unlink, f"{bindspace}/{RECORD_NAME}"), (os.rmdir, f"{bindspace}/tractor")):
        try:
            remove(path)
        except FileNotFoundError:
            pass
        except OSError:
            break
    try:
        os.rmdir(bindspace)
    except OSError:
        shutil.rmtree(bindspace, ignore_errors=True)
