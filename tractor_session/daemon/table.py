"""The lease table: the live leases of one daemon and what they hold.

Bookkeeping here is synchronous and quick (a few syscalls on a tmpfs), so
the daemon calls it straight from its trio thread: no await splits picking
a port from recording who holds it, which is what keeps two leases from
ever sharing a port or a directory.  The one slow step, removing an ended
lease's directory (it may hold 200k files), runs in a worker thread
(:meth:`LeaseTable.end`); the lease keeps its name and its port until its
directory is gone, and keeps them for good if it cannot be removed.

Every directory operation goes through the root's fd
(:class:`~tractor_session.rootdir.RootDir`).  The rules of who may have a
lease, and what ends one, are :mod:`tractor_session.daemon.sessions`';
this module only creates, finds and frees.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import msgspec
import trio

from tractor_session import envelope
from tractor_session.daemon.ports import PortPool, PortPoolError
from tractor_session.paths import SHORT_NAME_LEN, bindspace_name, root_too_long, short_name
from tractor_session.protocol import LeaseInfo, LeaseRequest
from tractor_session.records import LeaseRecord, create_record, write_record
from tractor_session.rootdir import RECORD_NAME, RootDir, remove_bindspace

log = logging.getLogger("tractor_session.daemon")


class LeaseError(RuntimeError):
    """A lease cannot be granted or found.  ``code`` is sent to the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(eq=False)
class Lease:
    record: LeaseRecord
    ended: bool = False
    # The pid of the ``lease -- CMD`` process that holds this lease through
    # a connection of this daemon's, once bound to CMD: the session's
    # subreaper, whose descendants are the session's.
    runner: int | None = None

    @property
    def lease_id(self) -> str:
        return self.record.lease_id

    @property
    def name(self) -> str:
        """Its bindspace's name in the root (4 hex digits, 12 if legacy)."""
        return self.record.bindspace.rpartition("/")[2]

    def info(self) -> LeaseInfo:
        r = self.record
        return LeaseInfo(
            lease_id=r.lease_id,
            bindspace=r.bindspace,
            transport=r.transport,
            registry_addr=envelope.registry_addr(r.transport, r.bindspace, r.port),
            port=r.port,
            holder_pid=r.holder_pid,
            created=r.created,
            expires=r.expires,
            parent=r.parent,
            reap=r.reap,
            net=r.net,
        )


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

    def __init__(self, root: RootDir, ports: PortPool, control_socket: Path) -> None:
        self.root = root
        self._socket = str(control_socket)
        self.ports = ports
        self.leases: dict[str, Lease] = {}
        # Short ids (12 hex) of the live leases, so prefix lookups are O(1).
        self.by_short: dict[str, Lease] = {}
        # parent lease id -> ids of its children (an xdist run's workers).
        self.children: dict[str, set[str]] = {}
        # lease id -> why it was ending, for the leases whose end failed part
        # way (processes that would not end, a directory that would not go):
        # they stay whole, with their port, and the next sweep ends them again.
        self.unfinished: dict[str, str] = {}
        # Leases whose directory a worker thread is removing right now.
        self.removing: set[str] = set()
        self._root_moved: str | None = None

    def __len__(self) -> int:
        return len(self.leases)

    def find(self, lease_id: str) -> Lease:
        """The live lease ``lease_id`` names: its full id, or any prefix of
        it (dashes optional) that no other live lease shares."""
        if (lease := self.leases.get(lease_id)) is not None:
            return lease
        digits = lease_id.replace("-", "")
        if len(digits) >= SHORT_NAME_LEN:
            lease = self.by_short.get(digits[:SHORT_NAME_LEN])
            found = [lease] if lease is not None and lease.lease_id.replace("-", "").startswith(digits) else []
        else:
            found = [lease for short, lease in self.by_short.items() if short.startswith(digits)]
        if len(found) == 1:
            return found[0]
        if not found:
            raise LeaseError("unknown-lease", f"no live lease {lease_id!r}; see `tractor-session status`")
        names = sorted(short_name(lease.lease_id) for lease in found)
        raise LeaseError(
            "ambiguous-id",
            f"{lease_id!r} names {len(names)} live leases: {', '.join(names[:10])}"
            f"{', ...' if len(names) > 10 else ''}; give more of the id",
        )

    async def take_port(self, req: LeaseRequest) -> int | None:
        """A registry port for ``req``, if it needs one (a search that may
        take a while, in a thread: see :meth:`PortPool.take`)."""
        if req.transport != "tcp" or req.net != "host":
            return None
        try:
            return await self.ports.take()
        except PortPoolError as err:
            raise LeaseError("no-free-port", str(err)) from None

    def create(
        self,
        req: LeaseRequest,
        holder_pid: int | None,
        holder_start: float | None,
        port: int | None,
    ) -> Lease:
        """Create a session: directory, record and envelope, with ``port``
        (from :meth:`take_port`; the caller gives it back if this fails).

        On any failure nothing is left behind: the directory is removed
        before the error propagates.  Refused while the root's path leads
        elsewhere: the envelope would send the session there.
        """
        if req.parent is not None and req.parent not in self.leases:
            raise LeaseError("unknown-lease", f"parent lease {req.parent[:80]!r} is not live")
        if (moved := self.check_root()) is not None:
            raise LeaseError("root-moved", moved)
        try:
            lease_id, name, fd = self._new_bindspace()
        except OSError as err:
            raise LeaseError("os-error", explain_os_error(err, self._root_path)) from None
        try:
            # No checks needed: the parent is ours alone, made just now.
            os.mkdir("tractor", 0o700, dir_fd=fd)
            if (too_long := root_too_long(self.root.path)) is not None:
                raise LeaseError("path-too-long", too_long)
            now = time.time()
            bindspace = self.root.path_of(name)
            record = LeaseRecord(
                lease_id=lease_id,
                bindspace=bindspace,
                transport=req.transport,
                port=port,
                env=envelope.session_env(
                    lease_id, bindspace, req.transport, port, control_socket=self._socket,
                    root=self.root.path, reap=req.reap, set_xdg=req.set_xdg, net=req.net,
                ),
                created=now,
                holder_pid=holder_pid,
                holder_start=holder_start,
                ttl=req.ttl,
                expires=now + req.ttl if req.ttl is not None else None,
                reap=req.reap,
                parent=req.parent,
                net=req.net,
            )
            create_record(record, fd)
        except BaseException as err:
            self._unmake(name, fd)
            if isinstance(err, OSError):
                raise LeaseError("os-error", explain_os_error(err, self._root_path)) from None
            raise
        finally:
            os.close(fd)
        return self._add(record)

    def _unmake(self, name: str, fd: int) -> None:
        """Undo a creation through the fd it holds: what it made needs no
        new fd to remove (the creation may have failed for want of fds).
        Best effort: what stays, record-less, is garbage after gc's grace."""
        for remove, entry, dir_fd in (
            (os.unlink, RECORD_NAME, fd), (os.rmdir, "tractor", fd), (os.rmdir, name, self.root.fd),
        ):
            with contextlib.suppress(OSError):
                remove(entry, dir_fd=dir_fd)

    @property
    def _root_path(self) -> Path:
        return Path(self.root.path)

    def check_root(self) -> str | None:
        """Why the root's path no longer leads to the root this daemon
        serves, or None; said loudly in the log when that changes."""
        moved = self.root.moved()
        if moved != self._root_moved:
            if moved is not None:
                log.error(
                    "%s; refusing new leases (their envelopes would lead there). Live leases are still"
                    " served and cleaned up in the directory this daemon opened at start-up. Restore"
                    " the root, or stop this daemon (`tractor-session stop`) so that a new one starts.", moved,
                )
            else:
                log.warning("the runtime root %s leads to this daemon's root again; granting leases", self.root.path)
            self._root_moved = moved
        return moved

    def adopt(self, record: LeaseRecord) -> Lease:
        """Take over a lease recorded by an earlier daemon (a record
        :mod:`.recovery` found sound)."""
        if record.port is not None:
            self.ports.adopt(record.port)
        lease = self._add(record)
        lease.runner = record.runner_pid
        return lease

    def _add(self, record: LeaseRecord) -> Lease:
        lease = Lease(record)
        self.leases[record.lease_id] = lease
        self.by_short[short_name(record.lease_id)] = lease
        if record.parent is not None:
            self.children.setdefault(record.parent, set()).add(record.lease_id)
        return lease

    def update(self, lease: Lease, **changes: object) -> None:
        """Change a lease's record, on disk first."""
        if lease.lease_id in self.removing:  # its record would stop the removal
            raise LeaseError("ended", f"lease {short_name(lease.lease_id)} is ending")
        new = msgspec.structs.replace(lease.record, **changes)
        fd = self.root.open_bindspace(lease.name)
        try:
            write_record(new, fd)
        finally:
            os.close(fd)
        lease.record = new

    async def end(self, lease: Lease, reason: str) -> None:
        """Remove a lease's directory (in a worker thread), then forget the
        lease and free its port.  Until the directory is gone the lease
        keeps both, so neither is handed out again while in use.

        A directory that cannot be removed leaves the lease whole (in the
        table, its record on disk, its port taken) and in ``unfinished``, and
        raises a :class:`LeaseError` saying so."""
        if lease.lease_id not in self.leases:
            return
        self.removing.add(lease.lease_id)
        try:
            # Abandoned if the daemon stops: the record goes last, so the next
            # daemon finds the lease and ends it again.
            await trio.to_thread.run_sync(
                remove_bindspace, self.root.fd, lease.name, abandon_on_cancel=True,
            )
        except OSError as err:
            self.unfinished[lease.lease_id] = reason
            raise LeaseError(
                "os-error",
                f"could not remove the directory {lease.record.bindspace} of lease {short_name(lease.lease_id)}"
                f" ({err}); the lease stays, with its port, and its end is retried at every gc sweep"
                " (or `tractor-session gc`)",
            ) from None
        finally:
            self.removing.discard(lease.lease_id)
        self.unfinished.pop(lease.lease_id, None)
        del self.leases[lease.lease_id]
        lease.ended = True
        del self.by_short[short_name(lease.lease_id)]
        if (parent := lease.record.parent) is not None and (siblings := self.children.get(parent)):
            siblings.discard(lease.lease_id)
            if not siblings:
                del self.children[parent]
        if lease.record.port is not None:
            self.ports.give_back(lease.record.port)

    def _new_bindspace(self) -> tuple[str, str, int]:
        """A fresh lease id, its bindspace's name, and the bindspace open."""
        for _ in range(100):
            lease_id = str(uuid.uuid4())
            name = bindspace_name(lease_id)
            try:
                # The daemon runs with umask 077, so this is exactly 0700.
                os.mkdir(name, 0o700, dir_fd=self.root.fd)
            except FileExistsError:
                continue
            try:
                return lease_id, name, self.root.open_bindspace(name)
            except BaseException:
                os.rmdir(name, dir_fd=self.root.fd)
                raise
        raise LeaseError("collision", f"could not create a unique bindspace in {self.root.path}")
