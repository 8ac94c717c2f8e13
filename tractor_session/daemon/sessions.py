"""The lease rules: who gets a session, and what ends one.

:class:`Sessions` owns every live lease's state: the table (directories,
ports, records), which connection or holder process bounds each lease,
the ttl clock, and the leases being ended.  A lease ends when it is
released, when its holder dies (a pidfd watch, or its connection
closing), when its ttl runs out, or when its parent ends; then its
leftover processes are reaped, and only then are its directory and port
freed.

Bookkeeping is synchronous (see :mod:`.table`), so requests never race
each other between two awaits; what takes long (port searches, reaping,
removals, sweeps) runs in worker threads or in the background.

Stopping the daemon keeps every live lease on disk: the next daemon
re-adopts them (:meth:`Sessions.recover`, :mod:`.recovery`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from types import MappingProxyType

import msgspec
import trio

from tractor_session import holder, protocol
from tractor_session.daemon import reaping, recovery
from tractor_session.daemon.config import Config
from tractor_session.daemon.holders import Expiries, HolderKey, HolderWatches, Peer, bound_by, check_holder, describe
from tractor_session.daemon.lifetime import Lifetime
from tractor_session.daemon.ports import PortPool
from tractor_session.daemon.systemd import LEASE_TRAFFIC, Notifier
from tractor_session.daemon.table import Lease, LeaseError, LeaseTable
from tractor_session.paths import short_name
from tractor_session.procs import Target, Victim, is_alive
from tractor_session.protocol import Bound, GcItem, LeaseRequest, Reaped, Released, Renewed, Shown, Status
from tractor_session.rootdir import RootDir

log = logging.getLogger("tractor_session.daemon")
traffic = logging.getLogger(LEASE_TRAFFIC)  # grants and releases: `serve -v`

CONNECTION_CLOSED = "its holder's connection closed"
ENDED_REMEMBERED = 256
"""How many ended leases' reasons are kept, so that a ``lease -- CMD``
whose session was ended under it can tell its user why."""


def _check_ttl(ttl: float) -> None:
    if not 0 < ttl < 10**9:  # also refuses NaN
        raise LeaseError("bad-request", f"ttl must be a positive number of seconds, not {ttl}")


class Sessions:
    def __init__(self, config: Config, notifier: Notifier, lifetime: Lifetime) -> None:
        self.config = config
        self.notifier = notifier
        self.lifetime = lifetime
        self.table = LeaseTable(RootDir.open(config.root), PortPool(config.port_pool), config.socket)
        self.ending: dict[str, trio.Event] = {}
        # One watch per holder process, however many leases it holds.
        self.by_holder: dict[HolderKey, set[str]] = {}
        self.holder_watches = HolderWatches(self._holder_exited)
        self.expiries = Expiries()
        self.scanner = reaping.LeftoverScanner()
        # Leases bound to a connection of this daemon; ended when it closes.
        self.connected: set[str] = set()
        # lease id -> why it ended, for the most recent ENDED_REMEMBERED.
        self.ended: dict[str, str] = {}
        self.readopted = 0
        # Set on SIGTERM/SIGINT: from then on nothing ends a lease, so that
        # every live one stays on disk for the next daemon.
        self.stopping = False
        self._nursery: trio.Nursery | None = None

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Re-adopt what is on disk, then keep time and sweep garbage until
        cancelled.  Started (``nursery.start``) once recovery is done."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.recover()
            nursery.start_soon(self.expiries.run, self._expired)
            nursery.start_soon(self._sweep_periodically)
            task_status.started()

    def recover(self) -> None:
        """Re-adopt the leases an earlier daemon left on disk (those
        :func:`.recovery.read_leases` finds sound), and end those whose
        bound process or parent ended meanwhile."""
        dead = 0
        for record in recovery.read_leases(self.table.root):
            lease = self.table.adopt(record)
            key = bound_by(lease.record)
            if record.parent is not None and record.parent not in self.table.leases:
                why = "its parent ended while no daemon ran"
            elif not is_alive(*key):
                why = f"{'its lease process' if lease.runner else 'its holder'} pid {key[0]} died while no daemon ran"
            else:
                self._track(lease)
                continue
            dead += 1
            self._end_in_background(lease, why)
        if dead:
            log.info("recovery: ending %d leases whose holders or parents ended meanwhile", dead)
        self.readopted = len(self.table) - dead

    # -- requests -------------------------------------------------------

    def find(self, lease_id: str) -> Lease:
        lease_id = protocol.check_id(lease_id)
        try:
            return self.table.find(lease_id)
        except LeaseError as err:
            if err.code == "unknown-lease" and (why := self.ended.get(lease_id)) is not None:
                raise LeaseError("ended", f"lease {short_name(lease_id)} has ended: {why}") from None
            raise

    async def grant(self, request: LeaseRequest, peer: Peer) -> Lease:
        # The port search (in a thread, see PortPool.take), then the rest with no await between.
        port = await self.table.take_port(request)
        try:
            return self._grant(request, peer, port)
        except BaseException:
            self.table.ports.give_back(port)
            raise

    def _grant(self, request: LeaseRequest, peer: Peer, port: int | None) -> Lease:
        if len(self.table) >= self.config.max_leases:
            raise LeaseError("too-many-leases", f"the daemon holds {len(self.table)} leases, its limit"
                             " (--max-leases); release some or run `tractor-session status`")
        if request.ttl is not None:
            _check_ttl(request.ttl)
        if request.parent is None and request.inside is not None:
            # A lease taken inside another session ends with it; an outer
            # session this daemon does not know (a stale environment) is
            # no reason to refuse.
            outer = self.table.leases.get(request.inside)
            if outer is not None and outer.lease_id not in self.ending:
                request = msgspec.structs.replace(request, parent=outer.lease_id)
        if request.parent is not None:
            parent = self.find(request.parent)
            if parent.lease_id in self.ending:
                raise LeaseError("unknown-lease", f"parent lease {parent.lease_id} is ending")
            request = msgspec.structs.replace(request, parent=parent.lease_id)
        by_connection = request.holder_pid is None
        if by_connection:
            holder, holder_start = peer.pid, peer.start
        else:
            assert request.holder_pid is not None
            holder, holder_start = request.holder_pid, check_holder(request.holder_pid)
        lease = self.table.create(request, holder if holder > 0 else None, holder_start, port)
        if by_connection:
            self.connected.add(lease.lease_id)
        self._track(lease)
        self._announce()
        if traffic.isEnabledFor(logging.INFO):  # info() is work; grants are the hot path
            traffic.info(
                "granted %s to pid %s: %s %s", short_name(lease.lease_id), holder,
                lease.record.transport, lease.info().registry_addr,
            )
        return lease

    async def release(self, lease: Lease, peer: Peer, by_holder: bool) -> Released:
        """``by_holder``: the connection that holds the lease releases it.
        When that is ``lease -- CMD`` (CMD ended), the releasing process is
        the session's subreaper, and its descendants are the session's."""
        await self._unless_ending(lease)
        # After a restart, the ``lease`` process releases on a new connection.
        by_holder |= lease.runner == peer.pid and peer.start == lease.record.runner_start
        # The requester may itself run inside the session (a script that
        # leased with --export): it and its ancestors are spared.
        reaped = await self.end_lease(
            lease, "released" if by_holder else f"released by {describe(peer.pid)}", released=True, spare=peer,
            roots={peer.pid: peer.start} if by_holder and lease.runner is not None and peer.pid > 0 else {},
        )
        self.connected.discard(lease.lease_id)
        return Released(lease.lease_id, reaped)

    async def _unless_ending(self, lease: Lease) -> None:
        """Return at once, unless something else is ending ``lease``: then
        wait for its end and raise why it ended, which is what a client
        asking about it must hear."""
        if (ending := self.ending.get(lease.lease_id)) is not None:
            await ending.wait()
            why = self.ended.get(lease.lease_id, "ended meanwhile")
            raise LeaseError("ended", f"lease {short_name(lease.lease_id)} has ended: {why}")

    def renew(self, lease: Lease, ttl: float | None) -> Renewed:
        if lease.record.ttl is None and (lease.runner is not None or lease.lease_id in self.connected):
            # A ttl would end the command in the middle of its work.
            raise LeaseError(
                "bad-request",
                f"lease {short_name(lease.lease_id)} lasts as long as the command or connection"
                " that holds it and takes no ttl; end it early with `tractor-session release`",
            )
        ttl = ttl if ttl is not None else lease.record.ttl
        if ttl is None:
            raise LeaseError("bad-request", f"lease {lease.lease_id} has no ttl; pass --ttl")
        _check_ttl(ttl)
        expires = time.time() + ttl
        self.table.update(lease, ttl=ttl, expires=expires)
        self._track_expiry(lease)
        return Renewed(lease.lease_id, expires)

    def bind(self, lease: Lease, pid: int) -> Bound:
        """Re-bind a lease to the command its connection runs, so that a
        daemon restarted mid-run knows what bounds it."""
        start = check_holder(pid)
        old_key = bound_by(lease.record)
        record = lease.record
        netns = record.netns
        if record.net == "private" and (theirs := holder.network_namespace(pid)) != holder.network_namespace():
            netns = theirs
        runner = (record.runner_pid, record.runner_start)
        if lease.lease_id in self.connected and record.runner_pid is None:
            runner = old_key  # the connection's process: a restarted daemon watches it instead
        self.table.update(lease, holder_pid=pid, holder_start=start, netns=netns, runner_pid=runner[0] or None,
                          runner_start=runner[1])
        lease.runner = runner[0] or None
        self._untrack_holder(lease, old_key)
        self._track(lease)
        return Bound(lease.lease_id)

    def status(self, lease_id: str | None = None) -> Status:
        if lease_id is not None:
            leases = [self.find(lease_id)]
        else:
            leases = [lease for lease in self.table.leases.values() if lease.lease_id not in self.ending]
        return Status(os.getpid(), str(self.config.root), [lease.info() for lease in leases])

    async def show(self, lease_id: str) -> Shown:
        """A live lease and its envelope.  Not once it is ending (what joined
        the session then would escape its reaping): that waits, to say why."""
        lease = self.find(lease_id)
        await self._unless_ending(lease)
        return Shown(lease.info(), lease.record.env, lease.record.holder_start, lease.record.netns)

    def connection_closed(self, lease: Lease) -> None:
        self.connected.discard(lease.lease_id)
        self._end_in_background(lease, CONNECTION_CLOSED)

    def _announce(self) -> None:
        """The number of leases changed: tell systemd, and the idle clock."""
        self.notifier.send(f"STATUS={len(self.table)} live leases")
        self.lifetime.changed()

    # -- what ends a lease by itself: its holder's death, its ttl -------

    def _track(self, lease: Lease) -> None:
        """Watch what can end ``lease`` other than a request.  A lease bound
        to one of our connections needs no pid watch: the connection closes
        when its process dies."""
        if lease.lease_id not in self.connected and lease.record.holder_pid is not None:
            key = bound_by(lease.record)
            self.by_holder.setdefault(key, set()).add(lease.lease_id)
            assert self._nursery is not None
            self.holder_watches.add(self._nursery, key)
        self._track_expiry(lease)

    def _untrack_holder(self, lease: Lease, key: HolderKey | None = None) -> None:
        key = key or bound_by(lease.record)
        if (ids := self.by_holder.get(key)) is not None:
            ids.discard(lease.lease_id)
            if not ids:
                del self.by_holder[key]
                self.holder_watches.remove(key)

    async def _holder_exited(self, key: HolderKey) -> None:
        for lease_id in self.by_holder.pop(key, ()):
            if (lease := self.table.leases.get(lease_id)) is not None:
                self._end_in_background(lease, f"{'its lease process' if lease.runner else 'holder'} pid {key[0]} died")

    def _track_expiry(self, lease: Lease) -> None:
        if lease.record.expires is not None:
            self.expiries.add(lease.record.expires, lease.lease_id)

    def _expired(self, lease_id: str, now: float) -> None:
        lease = self.table.leases.get(lease_id)
        if lease is not None and lease.record.expires is not None and lease.record.expires <= now:
            self._end_in_background(lease, "its ttl expired")

    # -- ending ---------------------------------------------------------

    def _end_in_background(self, lease: Lease, reason: str) -> None:
        assert self._nursery is not None
        if not self.stopping and not lease.ended and lease.lease_id not in self.ending:
            self._nursery.start_soon(self._end_logging_errors, lease, reason)

    async def _end_logging_errors(self, lease: Lease, reason: str) -> None:
        """A lease that fails to end (out of fds, say) stays live and
        watched; the failure costs a log line, never the daemon."""
        try:
            await self.end_lease(lease, reason)
        except LeaseError as err:  # says all there is to say
            log.error("could not end lease %s (%s): %s", short_name(lease.lease_id), reason, err)
        except Exception:
            log.exception("could not end lease %s (%s); it stays live", short_name(lease.lease_id), reason)

    async def end_lease(
        self,
        lease: Lease,
        reason: str,
        released: bool = False,
        spare: Peer | None = None,
        roots: Mapping[int, float | None] = MappingProxyType({}),
    ) -> list[Reaped]:
        """End a lease: end its child leases, reap what its session left
        running (with the descendants of ``roots``, pids with their start
        times, but not ``spare`` and its ancestors), then free its
        directory and port.  Concurrent calls wait for the first one."""
        if lease.ended or self.stopping:
            return []
        if (done := self.ending.get(lease.lease_id)) is not None:
            await done.wait()
            return []
        done = self.ending[lease.lease_id] = trio.Event()
        reaped: list[Reaped] = []
        try:
            children = [
                child for child_id in self.table.children.get(lease.lease_id, ())
                if (child := self.table.leases.get(child_id)) is not None
            ]
            if children:
                async with trio.open_nursery() as nursery:
                    for child in children:
                        # One child that cannot end must not cancel its siblings' ends.
                        nursery.start_soon(self._end_logging_errors, child, f"its parent {short_name(lease.lease_id)} ended")
            if lease.record.reap:
                try:
                    reaped = await self._reap(lease, spare, roots)
                except RuntimeError as err:
                    self.table.unfinished[lease.lease_id] = reason
                    raise LeaseError("reap-failed", f"could not end the processes of lease {lease.lease_id}: {err}."
                                     " It stays, with its directory and port, and is ended again at every gc sweep"
                                     f" (or `tractor-session gc`); `tractor-session ps {lease.lease_id}` shows them") from None
            # Not reached when the daemon stops mid-reap: the lease then stays
            # on disk and the next daemon, finding its holder dead, ends it.
            await self.table.end(lease, reason)
            self.ended[lease.lease_id] = reason
            if len(self.ended) > ENDED_REMEMBERED:
                del self.ended[next(iter(self.ended))]
            self._untrack_holder(lease)
            self.expiries.discard(lease.lease_id)
            self._announce()
        finally:
            del self.ending[lease.lease_id]
            done.set()
        # A release, or a client closing its connection, is routine (logged
        # with the grants, if asked); a death, an expiry or a reap is worth a line.
        routine = released or reason == CONNECTION_CLOSED
        (traffic if routine and not reaped else log).info(
            "ended %s (%s)%s", short_name(lease.lease_id), reason,
            f", reaped {len(reaped)}: " + ", ".join(f"{r.pid} {r.cmdline[:60]!r}" for r in reaped)
            if reaped else "",
        )
        return reaped

    async def _reap(self, lease: Lease, spare: Peer | None, roots: Mapping[int, float | None]) -> list[Reaped]:
        """End a session's processes, but ``spare`` and its ancestors, and
        return only once none is left (see :func:`reaping.end_processes`).

        Always a scan: a process that existed before the lease can join its
        session by ``execve`` alone, with nothing cheaper to tell."""
        record = lease.record
        roots = dict(roots)
        if lease.runner is not None and record.holder_pid and is_alive(record.holder_pid, record.holder_start):
            # The command of a ``lease -- CMD`` whose lease process died.
            roots[record.holder_pid] = record.holder_start
        lineage: frozenset[int] | None = None

        async def find() -> list[Victim]:
            nonlocal lineage
            # A root that has died is none: its pid may be another process's by now.
            live = frozenset(pid for pid, start in roots.items() if is_alive(pid, start))
            victims = await self.scanner.find(lease.lease_id, Target(live, record.netns))
            if lease.runner is not None:
                # The ``lease`` process may share a private network with the
                # session: it ends when CMD does, and must be there to say why.
                victims = [v for v in victims if v.pid != lease.runner]
            if victims and spare is not None:
                # Looked up only now: walking the ancestry costs, and most
                # sessions leave nothing to reap.
                lineage = spare.lineage() if lineage is None else lineage
                victims = [v for v in victims if v.pid not in lineage]
            return victims

        return await reaping.end_processes(find, self.config.reap_grace)

    # -- garbage ----------------------------------------------------------

    async def collect(self, dry_run: bool = False, grace: float | None = None) -> list[GcItem]:
        """Find (and unless ``dry_run``, remove) the root's garbage."""
        grace = self.config.gc_grace if grace is None else grace
        self.table.check_root()
        if not dry_run:
            for lease_id, reason in list(self.table.unfinished.items()):
                if (lease := self.table.leases.get(lease_id)) is not None:
                    self._end_in_background(lease, reason)
        # Live ids are read after the scan: a lease granted while it ran is
        # spared (grants happen in this thread, whole, between two awaits).
        return await reaping.collect_garbage(
            self.table.root, grace, lambda: {i: lease.name for i, lease in self.table.leases.items()},
            self.config.reap_grace, dry_run,
        )

    async def _sweep_periodically(self) -> None:
        while True:
            try:
                removed = await self.collect()
            except Exception:
                # One odd entry in the root must not stop the daemon.
                log.exception("gc sweep failed; retrying in %g s", self.config.gc_interval)
            else:
                if removed:
                    kinds = sorted({item.kind for item in removed})
                    log.info("gc sweep removed %d item(s): %s", len(removed), ", ".join(kinds))
            await trio.sleep(self.config.gc_interval)
