"""The lease table: granting, recording and ending sessions.

Everything here is synchronous and quick (a few syscalls on a tmpfs), so
the daemon calls it straight from its trio thread: no await splits picking
a port from recording who holds it, which is what keeps two leases from
ever sharing a port or a directory.

Each lease is recorded in its own bindspace (:data:`RECORD_NAME`), written
to a temporary file and renamed into place, so a daemon killed at any
instant leaves either the old record or the new one.  A directory and its
record are one unit: a restarted daemon re-adopts a lease by reading the
records it finds, and a bindspace without a record is garbage once it is
older than the GC grace period.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import msgspec

from tractor_session import envelope
from tractor_session.paths import ROOT_ENV, SOCKET_ENV, fits_af_unix, short_name
from tractor_session.ports import PortPool, PortPoolError
from tractor_session.protocol import LeaseInfo, LeaseRequest, Transport

RECORD_NAME = ".tractor-session-lease"
BINDSPACE_NAME_RE = re.compile(r"[0-9a-f]{12}")
UDS_REGISTRY_NAME = "registry@1616.sock"
# The longest socket name tractor may create in a bindspace: a compacted
# actor name and a 7-digit pid.
DEEPEST_SOCKET_NAME = f"actor.{'0' * 32}@{'9' * 7}.sock"


class LeaseError(RuntimeError):
    """A lease cannot be granted or found.  ``code`` is sent to the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


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


@dataclass(eq=False)
class Lease:
    record: LeaseRecord
    ended: bool = False

    @property
    def lease_id(self) -> str:
        return self.record.lease_id

    def info(self) -> LeaseInfo:
        r = self.record
        return LeaseInfo(
            lease_id=r.lease_id,
            bindspace=r.bindspace,
            transport=r.transport,
            registry_addr=registry_addr(r.transport, r.bindspace, r.port),
            port=r.port,
            holder_pid=r.holder_pid,
            created=r.created,
            expires=r.expires,
            parent=r.parent,
            reap=r.reap,
        )


def registry_addr(transport: Transport, bindspace: str, port: int | None) -> tuple[str, int | str]:
    if transport == "uds":
        return (f"{bindspace}/tractor", UDS_REGISTRY_NAME)
    assert port is not None
    return ("127.0.0.1", port)


_DEFAULT_RTVARS = envelope.RuntimeVars().to_dict()
_record_encoder = msgspec.json.Encoder()
_record_decoder = msgspec.json.Decoder(LeaseRecord)


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
        os.write(fd, _record_encoder.encode(record))
    finally:
        os.close(fd)


def read_record(bindspace: Path) -> LeaseRecord | None:
    """The record in ``bindspace``, or None if there is none (or only
    something that is not a record).  Raises ``OSError`` when it cannot
    tell, so that no one mistakes a live lease for garbage."""
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
        record = _record_decoder.decode(data)
    except msgspec.DecodeError:
        return None
    # A record only counts for the directory it sits in.
    if Path(record.bindspace) != bindspace or short_name(record.lease_id) != bindspace.name:
        return None
    return record


def remove_bindspace(root: str, bindspace: str) -> None:
    """Remove a session directory without ever following a symlink.

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


def explain_os_error(err: OSError, root: Path) -> str:
    """Turn a failed syscall into a message that says what to do next."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"the filesystem of {root} is full (no space or no inodes left): {err.strerror}."
            " Free some space there (`tractor-session gc` removes stale sessions) and retry."
        )
    if err.errno in (errno.EMFILE, errno.ENFILE):
        return (
            f"the daemon is out of file descriptors ({err.strerror}); retry once"
            " some leases are released, or raise `ulimit -n` for it"
        )
    return f"could not create the session under {root}: {err}"


class LeaseTable:
    """The live leases of one daemon, and the resources they hold."""

    def __init__(self, root: Path, ports: PortPool, control_socket: Path) -> None:
        self.root = root
        self._root = str(root)
        self._socket = str(control_socket)
        self.ports = ports
        self.leases: dict[str, Lease] = {}
        # 12-hex names handed out, so prefix lookups and collisions are O(1).
        self.by_short: dict[str, Lease] = {}
        # parent lease id -> ids of its children (an xdist run's workers).
        self.children: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self.leases)

    def find(self, lease_id: str) -> Lease:
        lease = self.leases.get(lease_id) or self.by_short.get(lease_id)
        if lease is None:
            raise LeaseError("unknown-lease", f"no live lease {lease_id!r}; see `tractor-session status`")
        return lease

    def grant(
        self,
        req: LeaseRequest,
        holder_pid: int | None,
        holder_start: float | None,
    ) -> Lease:
        """Create a session: directory, port, record and envelope.

        On any failure nothing is left behind: the directory is removed and
        the port given back before the error propagates.
        """
        if req.parent is not None and req.parent not in self.leases:
            raise LeaseError("unknown-lease", f"parent lease {req.parent[:80]!r} is not live")
        try:
            lease_id, bindspace = self._new_bindspace()
        except OSError as err:
            raise LeaseError("os-error", explain_os_error(err, self.root)) from None
        port: int | None = None
        try:
            # No checks needed: the parent is ours alone, made just now.
            tractor_dir = f"{bindspace}/tractor"
            os.mkdir(tractor_dir, 0o700)
            deepest = f"{tractor_dir}/{DEEPEST_SOCKET_NAME}"
            if not fits_af_unix(deepest):
                raise LeaseError(
                    "path-too-long",
                    f"socket paths in the bindspace would be too long for AF_UNIX:"
                    f" {deepest} is {len(os.fsencode(deepest))} bytes. Use a shorter"
                    f" runtime root (set {ROOT_ENV}).",
                )
            if req.transport == "tcp":
                try:
                    port = self.ports.take()
                except PortPoolError as err:
                    raise LeaseError("no-free-port", str(err)) from None
            now = time.time()
            record = LeaseRecord(
                lease_id=lease_id,
                bindspace=bindspace,
                transport=req.transport,
                port=port,
                env=self._envelope(lease_id, bindspace, req, port),
                created=now,
                holder_pid=holder_pid,
                holder_start=holder_start,
                ttl=req.ttl,
                expires=now + req.ttl if req.ttl is not None else None,
                reap=req.reap,
                parent=req.parent,
            )
            create_record(record)
        except BaseException as err:
            if port is not None:
                self.ports.give_back(port)
            remove_bindspace(self._root, bindspace)
            if isinstance(err, OSError):
                raise LeaseError("os-error", explain_os_error(err, self.root)) from None
            raise
        return self._add(record)

    def adopt(self, record: LeaseRecord) -> Lease:
        """Take over a lease recorded by an earlier daemon."""
        if record.port is not None:
            self.ports.adopt(record.port)
        return self._add(record)

    def _add(self, record: LeaseRecord) -> Lease:
        lease = Lease(record)
        self.leases[record.lease_id] = lease
        self.by_short[short_name(record.lease_id)] = lease
        if record.parent is not None:
            self.children.setdefault(record.parent, set()).add(record.lease_id)
        return lease

    def update(self, lease: Lease, **changes: object) -> None:
        """Change a lease's record, on disk first."""
        new = msgspec.structs.replace(lease.record, **changes)
        write_record(new)
        lease.record = new

    def end(self, lease: Lease) -> None:
        """Forget a lease and free its directory and port.  Idempotent."""
        if self.leases.pop(lease.lease_id, None) is None:
            return
        lease.ended = True
        del self.by_short[short_name(lease.lease_id)]
        if (parent := lease.record.parent) is not None and (siblings := self.children.get(parent)):
            siblings.discard(lease.lease_id)
            if not siblings:
                del self.children[parent]
        remove_bindspace(self._root, lease.record.bindspace)
        if lease.record.port is not None:
            self.ports.give_back(lease.record.port)

    def _new_bindspace(self) -> tuple[str, str]:
        for _ in range(100):
            lease_id = str(uuid.uuid4())
            bindspace = f"{self._root}/{short_name(lease_id)}"
            try:
                # The daemon runs with umask 077, so this is exactly 0700.
                os.mkdir(bindspace, 0o700)
            except FileExistsError:
                continue
            return lease_id, bindspace
        raise LeaseError("collision", f"could not create a unique bindspace in {self.root}")

    def _envelope(self, lease_id: str, bindspace: str, req: LeaseRequest, port: int | None) -> dict[str, str]:
        # Built from our own values, whose types are right by construction,
        # so the validating RuntimeVars path (dozens of microseconds a lease)
        # is skipped: a copy of the defaults, updated, is the same str(dict).
        rtvars = dict(_DEFAULT_RTVARS)
        rtvars.update(
            _enable_tpts=[req.transport],
            _registry_addrs=[registry_addr(req.transport, bindspace, port)],
            _session_uuid=lease_id,
            _bindspace=bindspace,
        )
        if not req.reap:
            rtvars[envelope.NO_REAP_KEY] = True
        env = {
            envelope._TRACTOR_RT_VARS_OSENV: str(rtvars),
            SOCKET_ENV: self._socket,
            ROOT_ENV: self._root,
        }
        if req.set_xdg:
            env["XDG_RUNTIME_DIR"] = bindspace
        return env
