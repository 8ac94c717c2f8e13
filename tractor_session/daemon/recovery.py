"""What an earlier daemon left on disk, made safe to adopt.

A restarted daemon trusts what it adopts: it watches the pids a record
names, holds (and later frees) its port, and follows its parent.  So
records are read like any hostile input, and one bad entry costs one
entry, never the daemon:

- a bindspace whose record cannot be read (no permission, a socket in the
  record's place, ...) is reported and skipped: this daemon does not serve
  that lease, and leaves its directory alone;
- a record that cannot be true, alone (a tcp lease without a port, its own
  parent, ...) or with the others (a port another record claims, a cycle
  of parents), is reported and quarantined: renamed aside
  (:data:`~tractor_session.records.QUARANTINED_NAME`), so that no daemon
  adopts it, people can read it, and garbage collection judges its
  directory by age, as one without a record.

The result comes parents first, so that every parent a lease names is in
the table before the lease, or is gone (then the lease ends with it).

Each re-adopted lease ends on the events that ended it before.  A lease
held on a connection lost it with the daemon: the next daemon watches the
process at the other end instead (for ``lease -- CMD``, the ``lease``
process, recorded as the record's *runner*, which releases when CMD ends),
so such a lease ends when that process dies or releases it, no longer
when it merely closes a connection.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tractor_session.procs import is_alive
from tractor_session.records import (
    BINDSPACE_NAME_RE,
    QUARANTINED_NAME,
    BadRecord,
    LeaseRecord,
    quarantine,
    read_record,
)

log = logging.getLogger("tractor_session.daemon")


def read_leases(root: Path) -> list[LeaseRecord]:
    """The lease records under ``root`` to adopt, parents first."""
    try:
        entries = sorted(os.scandir(root), key=lambda entry: entry.name)
    except FileNotFoundError:
        return []
    records: list[LeaseRecord] = []
    for entry in entries:
        try:
            # A symlink named like a bindspace is garbage, never a lease.
            if not (BINDSPACE_NAME_RE.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)):
                continue
            record = read_record(Path(entry.path))
        except BadRecord as bad:
            _quarantine(entry.path, str(bad))
            continue
        except OSError as err:
            log.warning(
                "recovery: cannot read the lease record in %s (%s); skipped: this daemon does not serve"
                " that lease. Make the directory readable (chmod 700) or remove it, then restart the daemon"
                " (`tractor-session stop`)", entry.path, err.strerror or err,
            )
            continue
        if record is not None:
            records.append(record)
    return _parents_first(_one_claim_per_port(records))


def _quarantine(bindspace: str, why: str) -> None:
    try:
        quarantine(bindspace)
    except OSError as err:
        log.warning("recovery: not adopting the lease in %s: %s; could not set its record aside: %s",
                    bindspace, why, err.strerror or err)
        return
    log.warning("recovery: not adopting the lease in %s: %s; its record is set aside as %s/%s",
                bindspace, why, bindspace, QUARANTINED_NAME)


def _one_claim_per_port(records: list[LeaseRecord]) -> list[LeaseRecord]:
    """Two records claiming one port cannot both be true; ending the false
    one would free the port under the true one.  The claim of a live
    holder wins, then the earlier one."""
    def claim(record: LeaseRecord) -> tuple[bool, float, str]:
        holder = record.runner_pid or record.holder_pid or 0
        start = record.runner_start if record.runner_pid else record.holder_start
        return (not is_alive(holder, start), record.created, record.lease_id)

    by_port: dict[int, LeaseRecord] = {}
    kept: list[LeaseRecord] = []
    for record in sorted(records, key=claim):
        if record.port is not None:
            if (first := by_port.get(record.port)) is not None:
                _quarantine(record.bindspace, f"its port {record.port} is lease {first.lease_id}'s")
                continue
            by_port[record.port] = record
        kept.append(record)
    return kept


def _parents_first(records: list[LeaseRecord]) -> list[LeaseRecord]:
    """``records`` ordered parents before children; the members of a
    parent cycle (which no grant can make) are quarantined.  A record whose
    parent is not among them stays: its parent ended, and it will too."""
    pending = {record.lease_id: record for record in records}
    ordered: list[LeaseRecord] = []
    while pending:
        ready = [r for r in pending.values() if r.parent is None or r.parent not in pending]
        if not ready:
            # Everything left is on a cycle or below one: quarantine one
            # cycle, and its descendants become orphans.
            for lease_id in _a_cycle(pending):
                _quarantine(pending.pop(lease_id).bindspace, "its parents form a cycle")
            continue
        for record in ready:
            ordered.append(pending.pop(record.lease_id))
    return ordered


def _a_cycle(pending: dict[str, LeaseRecord]) -> list[str]:
    """The ids of one parent cycle in ``pending``, where every record's
    parent is pending too (so following parents must come round)."""
    seen: list[str] = []
    lease_id = next(iter(pending))
    while lease_id not in seen:
        seen.append(lease_id)
        parent = pending[lease_id].parent
        assert parent is not None
        lease_id = parent
    return seen[seen.index(lease_id):]
