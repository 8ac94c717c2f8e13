"""Starting a daemon on demand, and waiting for one to go.

The cold side of :mod:`tractor_session.client`: imported only when no
daemon answers (or by ``tractor-session stop``), so that the hot path of
every test run does not pay for it.

A daemon started here is everyone's (a session's variables do not leak
into it), nobody's child (it detaches, the way gpg-agent does), logs to
``<root>-session/daemon.log`` (which it rotates itself, however long it
runs) and exits once it has been idle for :data:`DAEMON_IDLE_EXIT` seconds
(``serve --exit-when-idle``): no live lease, no client connected.  A
daemon run by hand or by systemd has no such limit unless given one.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import sys
import time

from tractor_session import envelope, paths
from tractor_session.client import ClientError, Connection, try_connect

REBIND_SIGNAL = signal.SIGUSR1
"""Asks a daemon whose control socket's file is gone to bind it again
(:mod:`tractor_session.daemon.control`)."""
DAEMON_START_TIMEOUT = 10.0
DAEMON_IDLE_EXIT = 300.0
IDLE_EXIT_ENV = "TRACTOR_SESSION_EXIT_WHEN_IDLE"
"""Overrides :data:`DAEMON_IDLE_EXIT` for the daemons clients start."""


def start_daemon(sock_path: str, env: dict[str, str]) -> Connection:
    """Start a daemon in the background, unless another client beats us;
    a connection to whichever daemon answers.  Its ``spawned`` is true
    when this call started that daemon (see :class:`Connection`).

    The spawn lock serialises clients that found no daemon; each re-checks
    after taking it, so only the first one actually starts a daemon.
    """
    root = paths.runtime_root(env)
    if (too_long := paths.root_too_long(root)) is not None:
        raise ClientError("unreachable", f"cannot start a daemon: {too_long}")
    idle_exit = _idle_exit(env)
    # Checked here too so that an unsafe directory is named to the user
    # rather than only in the log of a daemon that refused to start.
    paths.ensure_private_dir(root)
    paths.ensure_private_dir(control := os.path.dirname(sock_path) or ".")
    spawn_lock = os.path.join(control, paths.SPAWN_LOCK_NAME)
    try:
        lock_fd = os.open(spawn_lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as err:
        raise ClientError("unreachable", f"cannot start a daemon: {spawn_lock}: {err.strerror}") from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if (conn := try_connect(sock_path)) is not None:
            return conn
        # A daemon may hold the lock without answering: stopping (a new one
        # started now would refuse to run), starting, or headless.
        if (conn := reach_headless_daemon(root, sock_path, DAEMON_START_TIMEOUT)) is not None:
            return conn
        _spawn_daemon(root, sock_path, env, idle_exit)
        if (conn := try_connect(sock_path)) is None:
            raise ClientError("unreachable", f"the daemon started but does not answer at {sock_path}")
        conn.spawned = True
        return conn
    finally:
        os.close(lock_fd)


def _idle_exit(env: dict[str, str]) -> str:
    """The ``--exit-when-idle`` a started daemon gets, as its argument."""
    text = env.get(IDLE_EXIT_ENV, "")
    if not text:
        return f"{DAEMON_IDLE_EXIT:g}"
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):  # also refuses NaN
        raise ClientError(
            "bad-request",
            f"${IDLE_EXIT_ENV} must be a positive number of seconds (how long a daemon started"
            f" on demand may stay idle), not {text!r}; unset it for the default {DAEMON_IDLE_EXIT:g}",
        )
    return text


def _lock_path(root: str) -> str:
    return os.path.join(paths.control_dir(root), paths.DAEMON_LOCK_NAME)


def wait_for_daemon_exit(root: str, timeout: float) -> bool:
    """Whether ``root``'s daemon lock is free, or becomes free within
    ``timeout`` seconds: the daemon holding it has let go of everything
    (its socket is gone first), and a new one may start."""
    try:
        fd = os.open(_lock_path(root), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return True
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.02)  # flock has no timeout of its own
    finally:
        os.close(fd)


def wait_for_process_end(pid: int, timeout: float) -> None:
    """Wait, at most ``timeout`` seconds, for process ``pid`` to end, as
    seen by a pidfd (Linux), which also counts a zombie as ended; elsewhere,
    return at once.  Briefly, after the daemon's lock is free: what is left
    of it then is the interpreter's exit."""
    if not hasattr(os, "pidfd_open"):
        return
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return  # ended (and reaped) already
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)


def _lock_holder(root: str) -> int | None:
    """The pid of the daemon holding ``root``'s lock (0 if it has not
    written it yet), or None when no daemon holds it."""
    try:
        fd = os.open(_lock_path(root), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 64).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        return None
    finally:
        os.close(fd)


def _is_serving(pid: int) -> bool:
    """Whether ``pid`` runs ``serve``: the lock's file may still name the
    daemon before the one that just took the lock, a pid since reused."""
    if not os.path.isdir("/proc/self"):
        return True  # no /proc (macOS): trust the lock
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    # Only a tractor-session ``serve``: never signal e.g. ``mkdocs serve``.
    return b"serve" in argv and any(b"tractor-session" in a or b"tractor_session" in a for a in argv)


def reach_headless_daemon(root: str, sock_path: str, timeout: float) -> Connection | None:
    """A connection to the daemon that holds ``root``'s lock although its
    control socket does not answer; None once no daemon holds the lock.

    Such a daemon is starting (it binds its socket in a moment), stopping
    (it lets go of the lock in a moment) or headless: its socket's file was
    deleted.  Each try asks it to bind the socket again
    (:data:`REBIND_SIGNAL`; see :mod:`tractor_session.daemon.control`),
    which the first two ignore."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while (pid := _lock_holder(root)) is not None:
        serving = pid > 0 and _is_serving(pid)
        if serving:
            try:
                os.kill(pid, REBIND_SIGNAL)
            except OSError:  # gone, or not ours to signal
                pass
        if (conn := try_connect(sock_path)) is not None:
            return conn
        if time.monotonic() > deadline and not serving:
            raise ClientError(
                "unreachable",
                f"{_lock_path(root)} is held by a process that is not a daemon (a `tractor-session gc`"
                f" without a daemon?) and no daemon answers at {sock_path} after {timeout:g} s;"
                " try again once it is done",
            )
        if time.monotonic() > deadline:
            raise ClientError(
                "unreachable",
                f"the daemon (pid {pid}) holds {_lock_path(root)} but does not answer at {sock_path},"
                f" not even after {timeout:g} s of asking it to bind it again; `kill {pid}` (its"
                " live leases stay on disk for the next daemon)",
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return None


def terminate_daemon(root: str) -> int:
    """SIGTERM ``root``'s daemon, found by its lock; return its pid.  For a
    daemon too old to know the ``stop`` request: SIGTERM stops it the same
    way.  The pid is the one the lock's holder wrote there, and the lock is
    checked to be held, so no other process is hit."""
    try:
        fd = os.open(_lock_path(root), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        raise ClientError("no-daemon", f"no daemon lock at {_lock_path(root)}: {err.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 64).decode(errors="replace").strip()
        else:
            raise ClientError("no-daemon", f"no daemon holds {_lock_path(root)}")
    finally:
        os.close(fd)
    if not text.isdigit():
        raise ClientError("unreachable", f"the daemon's lock {_lock_path(root)} names no pid ({text[:20]!r}); `kill` the daemon")
    os.kill(pid := int(text), signal.SIGTERM)
    return pid


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as log:
            lines = log.read().strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "no log"


# Run by an intermediate interpreter that exits at once: the daemon it
# forks is nobody's child (re-parented to init, or to a subreaper above
# us), so no harness that signals its own children (tractor's pytest
# reapers do) can stop it, the way gpg-agent detaches.  The daemon's pid
# goes down the ready pipe first, so that one that never gets ready can be
# killed.
_DETACH = """\
import os, sys
ready = int(sys.argv[1])
pid = os.fork()
if pid:
    os.write(ready, b"%d\\n" % pid)
    os._exit(0)
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def _spawn_daemon(root: str, sock_path: str, env: dict[str, str], idle_exit: str) -> None:
    log_path = os.path.join(os.path.dirname(sock_path), paths.DAEMON_LOG_NAME)
    # A session's variables must not leak into a daemon started from inside
    # it: the daemon is everyone's, not the session's.
    daemon_env = {k: v for k, v in env.items() if k not in envelope.SESSION_VARS}
    daemon_env[envelope.ROOT_ENV] = root
    read_fd, write_fd = os.pipe()
    try:
        # The daemon rotates its log (--log-file); its stdout and stderr go
        # there too, and follow it, for what it says before logging starts.
        with open(log_path, "ab") as log:
            os.chmod(log_path, 0o600)
            detacher = subprocess.Popen(
                [sys.executable, "-c", _DETACH, str(write_fd),
                 "-m", "tractor_session", "serve",
                 "--root", root, "--socket", sock_path, "--ready-fd", str(write_fd),
                 "--exit-when-idle", idle_exit, "--log-file", log_path],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                pass_fds=(write_fd,), start_new_session=True, env=daemon_env,
                cwd="/",
            )
        os.close(write_fd)
        write_fd = -1
        detacher.wait()
        said = _read_until_ready(read_fd, DAEMON_START_TIMEOUT)
        if not said.endswith(b"ready\n"):
            pid = said.split(b"\n")[0]
            if pid.isdigit():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
            raise ClientError(
                "unreachable",
                f"the daemon did not start: {_last_line(log_path)} (full log: {log_path})",
            )
    except OSError as err:
        raise ClientError("unreachable", f"cannot start a daemon: {err}") from None
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


def _read_until_ready(fd: int, timeout: float) -> bytes:
    """What the daemon's side of the ready pipe said until ``ready``, its
    end (the daemon died) or ``timeout``."""
    said = b""
    deadline = time.monotonic() + timeout
    while not said.endswith(b"ready\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready or not (data := os.read(fd, 64)):
            break
        said += data
    return said
