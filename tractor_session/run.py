"""``tractor-session lease -- CMD``: run a command inside a new session.

The ``lease`` process takes the lease on its connection to the daemon,
spawns CMD with the envelope, passes SIGINT, SIGTERM and SIGHUP on to it,
waits for it, releases the lease and exits with CMD's status (128+N when
CMD died of signal N).  The lease is bound to the connection, so if this
process is SIGKILLed the daemon sees the connection close and ends the
session; CMD's pid is told to the daemon too (``bind``), so that a daemon
restarted mid-run still knows what bounds the lease.

Before CMD starts, this process becomes the session's subreaper, and with
``--net private`` it enters a network of the session's own, which CMD
inherits (:mod:`tractor_session.holder`).  If that cannot be done, CMD
never runs: ``lease`` releases the lease, says why, and exits with
:data:`SETUP_FAILED`.

This is the hot path of every test run: the standard library only, the
daemon spoken to in plain data, and ``posix_spawn`` rather than
``subprocess`` (which alone costs milliseconds to import).
"""

from __future__ import annotations

import os
import signal
import sys

from tractor_session.client import ClientError, connect, grant, release_plain
from tractor_session.envelope import SUBREAPER_ENV
from tractor_session.paths import short_name

TYPE_CHECKING = False  # see client.py
if TYPE_CHECKING:
    from typing import Any

PROG = "tractor-session"
SETUP_FAILED = 125
"""``lease``'s exit status when the session could not be set up and CMD
never ran (as ``docker run`` and ``env`` use it)."""
SESSION_ENDED = 124
"""``lease``'s exit status when the session ended under CMD for another
reason than CMD ending (released by another client, its parent ended):
the daemon then ended CMD too, and ``lease`` says why."""
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _kernel_already_delivered(sig: int) -> bool:
    """Whether a SIGINT most likely came from the terminal, which sends it
    to the whole foreground process group, CMD included: forwarding it too
    would hit CMD twice (and a second ^C aborts pytest's teardown)."""
    if sig != signal.SIGINT or sys.stdin is None:
        return False
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError):
        return False


def run(request: dict[str, Any], command: list[str]) -> int:
    """Lease a session as ``request`` asks, run ``command`` in it, and
    return the exit status ``lease`` exits with."""
    from tractor_session import holder

    conn = connect()
    lease, session_env = grant(conn, request)
    lease_id: str = lease["lease_id"]
    env = {**os.environ, **session_env, SUBREAPER_ENV: str(os.getpid())}
    holder.become_subreaper()
    if request.get("net") == "private":
        try:
            holder.enter_private_network()
        except holder.PrivateNetworkError as err:
            release_plain(conn, lease_id)
            print(f"{PROG}: {err}", file=sys.stderr)
            return SETUP_FAILED
    child: list[int] = []  # the command's pid, once spawned
    early: list[int] = []  # signals that came before it was

    def forward(signum: int, _frame: object) -> None:
        # The command is our child and not yet waited for, so its pid
        # cannot have been reused.
        if _kernel_already_delivered(signum):
            return
        if child:
            os.kill(child[0], signum)
        else:
            early.append(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        try:
            # Python ignores SIGPIPE; the command gets the default.
            pid = os.posix_spawnp(command[0], command, env, setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
        except OSError as err:
            release_plain(conn, lease_id)
            print(f"{PROG}: cannot run {command[0]!r}: {err.strerror}", file=sys.stderr)
            return 127 if isinstance(err, FileNotFoundError) else 126
        child.append(pid)
        for signum in early:
            os.kill(pid, signum)
        try:
            conn.call({"type": "bind", "lease_id": lease_id, "pid": pid}, "bound")
        except ClientError:
            pass  # the lease stays bound to this process's connection
        _, status = os.waitpid(pid, 0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    returncode = os.waitstatus_to_exitcode(status)
    # A ^C now would only hide the command's exit status behind ours.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        released = release_plain(conn, lease_id)
    except ClientError as ended:
        print(f"{PROG}: the session ended under {command[0]!r}, which was ended with it: {ended}", file=sys.stderr)
        _collect_orphans()
        return SESSION_ENDED
    finally:
        signal.signal(signal.SIGINT, previous[signal.SIGINT])
    if released is not None and (summary := _reap_summary(lease_id, released.get("reaped"))):
        print(summary, file=sys.stderr)
    _collect_orphans()
    return 128 - returncode if returncode < 0 else returncode


def _collect_orphans() -> None:
    """Wait for the session's orphans the daemon ended: as their subreaper
    this process is their parent now, and they would stay zombies."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def _reap_summary(lease_id: str, reaped: object) -> str | None:
    """One line on the leftover processes a release ended, if any."""
    if not (reaped and isinstance(reaped, list) and all(isinstance(r, dict) for r in reaped)):
        return None
    kinds = sorted({str(r.get("signal")) for r in reaped})
    return (
        f"{PROG}: reaped {len(reaped)} leftover process(es) of session"
        f" {short_name(lease_id)} ({'/'.join(kinds)}): "
        + ", ".join(f"{r.get('pid')} {str(r.get('cmdline'))[:40]}" for r in reaped[:5])
    )
