"""The on-disk lease record.

Each lease is recorded in its own bindspace (:data:`RECORD_NAME`), written
to a temporary file and renamed into place, so a daemon killed at any
instant leaves either the old record or the new one.  A directory and its
record are one unit: a restarted daemon re-adopts a lease by reading the
records it finds, and garbage collection judges a directory by its record
(or, without one, by its age).  The daemon reads and writes records
relative to its bindspaces' directory fds (:mod:`tractor_session.rootdir`).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import msgspec

from tractor_session.paths import short_name
from tractor_session.protocol import Net, Transport
from tractor_session.rootdir import BINDSPACE_NAME_RE as BINDSPACE_NAME_RE
from tractor_session.rootdir import RECORD_NAME as RECORD_NAME
from tractor_session.rootdir import RootDir


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


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(LeaseRecord)


def create_record(record: LeaseRecord, bindspace_fd: int) -> None:
    """Write the first record of a brand-new bindspace, open as ``bindspace_fd``.

    No temporary file is needed: a crash mid-write leaves a record that does
    not parse, which counts as no record, the state before the write.
    """
    _write_file(RECORD_NAME, bindspace_fd, record, os.O_EXCL)


def write_record(record: LeaseRecord, bindspace_fd: int) -> None:
    """Atomically rewrite a lease's record inside its bindspace, open as
    ``bindspace_fd``."""
    tmp = f"{RECORD_NAME}.{os.getpid()}.tmp"
    _write_file(tmp, bindspace_fd, record, os.O_TRUNC)
    os.replace(tmp, RECORD_NAME, src_dir_fd=bindspace_fd, dst_dir_fd=bindspace_fd)


def _write_file(name: str, dir_fd: int, record: LeaseRecord, mode: int) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | mode, 0o600, dir_fd=dir_fd)
    try:
        os.write(fd, _encoder.encode(record))
    finally:
        os.close(fd)


def read_bindspace_record(root: RootDir, name: str) -> LeaseRecord | None:
    """The record of the bindspace ``name`` in ``root``, read through their
    fds; None if ``name`` is not a directory.  Raises like :func:`read_record`."""
    try:
        fd = root.open_bindspace(name)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            return None
        raise
    try:
        return read_record(Path(root.path_of(name)), fd)
    finally:
        os.close(fd)


def read_record(bindspace: Path, dir_fd: int) -> LeaseRecord | None:
    """The record in ``bindspace``, open as ``dir_fd``, or None if there is
    none (or only something that is not a record).  Raises ``OSError`` when
    it cannot tell, so that no one mistakes a live lease for garbage."""
    try:
        # O_NONBLOCK: a FIFO planted under the record's name must not hang us.
        fd = os.open(RECORD_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
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
    except msgspec.DecodeError:
        return None
    # A record only counts for the directory it sits in.
    if Path(record.bindspace) != bindspace or short_name(record.lease_id) != bindspace.name:
        return None
    return record
