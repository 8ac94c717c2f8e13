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

``tractor-session exec ID -- CMD`` (:func:`exec_in`) runs a command
inside a session that already lives, with the same envelope, in its
private network if it has one, and exits the same way.

``lease`` is the hot path of every test run: the standard library only,
the daemon spoken to in plain data, and ``posix_spawn`` rather than
``subprocess`` (which alone costs milliseconds to import).
"""

from __future__ import annotations

import errno
import os
import signal
import sys

from tractor_session.client import ClientError, connect, grant, release_plain
from tractor_session.envelope import SESSION_VARS, SUBREAPER_ENV, XDG_ENV
from tractor_session.paths import short_name

TYPE_CHECKING = False  # see client.py
if TYPE_CHECKING:
    from collections.abc import Callable
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

    def bind(pid: int) -> None:
        try:
            conn.call({"type": "bind", "lease_id": lease_id, "pid": pid}, "bound")
        except ClientError:
            pass  # the lease stays bound to this process's connection

    try:
        status = _spawn_and_wait(command, env, bind)
    except OSError as err:
        release_plain(conn, lease_id)
        return _cannot_run(command, err)
    returncode = os.waitstatus_to_exitcode(status)
    # A ^C now would only hide the command's exit status behind ours.
    previous_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        released = release_plain(conn, lease_id)
    except ClientError as ended:
        # SIGINT stays ignored to the end: when this `lease` runs inside
        # another session that is ending too, that one's reaping must not
        # turn the status decided here into a KeyboardInterrupt.
        print(f"{PROG}: the session ended under {command[0]!r}, which was ended with it: {ended}", file=sys.stderr)
        _collect_orphans()
        return SESSION_ENDED
    signal.signal(signal.SIGINT, previous_sigint)
    if released is not None and (summary := _reap_summary(lease_id, released.get("reaped"))):
        print(summary, file=sys.stderr)
    _collect_orphans()
    return 128 - returncode if returncode < 0 else returncode


def _spawn_and_wait(
    command: list[str], env: dict[str, str], started: Callable[[int], None],
    network: tuple[int, int] | None = None,
) -> int:
    """Start ``command`` with ``env`` (inside ``network``, namespaces
    :func:`~tractor_session.holder.join_network` enters), call
    ``started(pid)``, pass SIGINT, SIGTERM and SIGHUP on to it, and return
    its wait status.  Raises ``OSError`` if it could not be started, and
    ``PrivateNetworkError`` if it could not join ``network``."""
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
        if network is None:
            # Python ignores SIGPIPE; the command gets the default.
            pid = os.posix_spawnp(command[0], command, env, setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
        else:
            pid = _fork_exec(command, env, network)
        child.append(pid)
        for signum in early:
            os.kill(pid, signum)
        started(pid)
        return os.waitpid(pid, 0)[1]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _fork_exec(command: list[str], env: dict[str, str], network: tuple[int, int]) -> int:
    """``posix_spawnp`` for a command that must first join a network, which
    only a fresh single-threaded child can do (see
    :func:`~tractor_session.holder.join_network`).  A failure in the child
    comes back through a close-on-exec pipe: ``OSError`` if the command
    could not be run, ``PrivateNetworkError`` if the network refused it."""
    from tractor_session import holder

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing here may return or raise
        step = b"join"
        try:
            os.close(read_fd)
            for sig in (*FORWARDED_SIGNALS, signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(sig, signal.SIG_DFL)
            holder.join_network(*network)
            step = b"exec"
            os.execvpe(command[0], command, env)
        except OSError as err:
            os.write(write_fd, b"%s %d" % (step, err.errno or 0))
        finally:
            os._exit(SETUP_FAILED)
    os.close(write_fd)
    with open(read_fd, "rb") as pipe:
        said = pipe.read()
    if not said:
        return pid  # exec'd (or killed by a signal before it could)
    os.waitpid(pid, 0)
    step, code = said.split()
    if step == b"join":
        raise holder.PrivateNetworkError(f"cannot enter the session's private network: {os.strerror(int(code))}")
    raise OSError(int(code), os.strerror(int(code)))


def _cannot_run(command: list[str], err: OSError) -> int:
    """Say why ``command`` could not be started; the exit status for it
    (127 not found, 126 not runnable, as shells have it)."""
    print(f"{PROG}: cannot run {command[0]!r}: {err.strerror}", file=sys.stderr)
    return 127 if err.errno == errno.ENOENT else 126


def exec_in(lease_id: str, command: list[str]) -> int:
    """Run ``command`` inside the live session ``lease_id`` names (any
    unique prefix; the daemon resolves it) and return the status ``exec``
    exits with, as :func:`run`'s; :data:`SETUP_FAILED` when the session
    cannot be found or joined.

    The command gets the session's envelope, what a ``lease`` command gets,
    so it is the session's: reaped when the session ends.  It does not get
    another session's variables this shell may carry, nor ``lease``'s
    subreaper (this process is none).  With a private network, the child
    joins the holder's namespaces; this process stays outside, where the
    session's reaping does not hit it too and signal the command twice.
    """
    from tractor_session import holder

    try:
        lease, session_env, netns = _show(lease_id)
    except ClientError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return SETUP_FAILED
    lease_id = lease["lease_id"]
    env = {name: value for name, value in os.environ.items() if name not in SESSION_VARS or name == XDG_ENV}
    env.update(session_env)
    ended_first: list[str] = []

    def check_live(pid: int) -> None:
        # The session may have ended since it was shown, and its reaping
        # not seen this command: then it ends here.
        if (why := _why_ended(lease_id)) is not None:
            ended_first.append(why)
            os.kill(pid, signal.SIGKILL)

    network = None
    try:
        if lease.get("net") == "private":
            network = holder.open_session_network(lease["holder_pid"], netns)
        status = _spawn_and_wait(command, env, check_live, network)
    except holder.PrivateNetworkError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return SETUP_FAILED
    except OSError as err:
        return _cannot_run(command, err)
    finally:
        for fd in network or ():
            os.close(fd)
    returncode = os.waitstatus_to_exitcode(status)
    # Killed, and the session is gone: the daemon's reaping ended it.
    why = ended_first[0] if ended_first else _why_ended(lease_id) if returncode < 0 else None
    if why is not None:
        print(f"{PROG}: the session ended under {command[0]!r}, which was ended with it: {why}", file=sys.stderr)
        return SESSION_ENDED
    return 128 - returncode if returncode < 0 else returncode


def _show(lease_id: str) -> tuple[dict[str, Any], dict[str, str], int | None]:
    """The live lease ``lease_id`` names, its envelope, and the inode of its
    private network: asked in plain data, as ``lease`` asks (no msgspec to
    import), so checked here."""
    with connect(autostart=False) as conn:
        shown = conn.call({"type": "show", "lease_id": lease_id}, "shown")
    lease, env, netns = shown.get("lease"), shown.get("env"), shown.get("netns")
    if not (
        isinstance(lease, dict) and isinstance(lease.get("lease_id"), str)
        and isinstance(lease.get("holder_pid"), int | None) and isinstance(netns, int | None)
        and isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    ):
        raise ClientError("protocol", f"malformed reply to show from the daemon: {shown!r:.200}")
    return lease, env, netns


def _why_ended(lease_id: str) -> str | None:
    """The daemon's word on why the session ``lease_id`` has ended; None
    while it lives, or when the daemon cannot tell (it is restarting)."""
    try:
        _show(lease_id)
    except ClientError as err:
        return str(err) if err.code in ("ended", "unknown-lease") else None
    return None


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
