"""Start-up and shut-down of the daemon.

:func:`serve` takes the one-daemon-per-root lock, binds the control socket
(or takes the one systemd passes; :mod:`.control` keeps it reachable),
composes the sessions and the server, and runs them under trio until
SIGTERM, SIGINT, a ``stop`` request or (if asked) a long enough idle
stretch (:mod:`.lifetime`).  Stopping keeps every live lease on disk for
the next daemon to re-adopt.
"""

from __future__ import annotations

import fcntl
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path

import trio

from tractor_session import paths
from tractor_session.autostart import REBIND_SIGNAL
from tractor_session.daemon import systemd
from tractor_session.daemon.config import Config
from tractor_session.daemon.control import ControlSocket, bind_control_socket
from tractor_session.daemon.lifetime import Lifetime
from tractor_session.daemon.ports import PortPoolError
from tractor_session.daemon.server import Server
from tractor_session.daemon.sessions import Sessions

log = logging.getLogger("tractor_session.daemon")


LOCK_PATIENCE = 0.2  # seconds a starting daemon waits for a probing client's shared lock


class AlreadyRunning(RuntimeError):
    pass


def acquire_daemon_lock(control_dir: Path) -> int:
    """Take the one-daemon-per-user lock; return its fd (keep it open).

    ``flock`` is atomic in the kernel, so of two daemons started in the same
    millisecond exactly one gets it; it is released when the process dies,
    however it dies.
    """
    lock_path = control_dir / paths.DAEMON_LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    # Clients probing for a daemon (status, gc...) hold the lock shared for
    # an instant: retry briefly so such a probe cannot make a daemon quit.
    deadline = time.monotonic() + LOCK_PATIENCE
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.01)
                continue
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise AlreadyRunning(
            f"another tractor-session daemon (pid {holder}) is already running"
            f" for {control_dir}; stop it first or use it"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


async def _run(
    config: Config, sessions: Sessions, lifetime: Lifetime, control: ControlSocket,
    notifier: systemd.Notifier, ready_fd: int | None,
) -> None:
    server = Server(config, sessions, lifetime)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(sessions.run)
            nursery.start_soon(server.serve, control)
            if notifier.watchdog_interval is not None:
                nursery.start_soon(_feed_watchdog, notifier, notifier.watchdog_interval)
            if ready_fd is not None:
                os.write(ready_fd, b"ready\n")
                os.close(ready_fd)
            notifier.send("READY=1", f"STATUS={len(sessions.table)} live leases")
            log.info(
                "serving %s: root %s, %d leases re-adopted, ports %d-%d%s",
                config.socket, config.root, sessions.readopted,
                config.port_pool.start, config.port_pool.stop - 1,
                "" if config.exit_when_idle is None else f", exits after {config.exit_when_idle:g} s idle",
            )
            why = await lifetime.wait(signals, server.idle)
            sessions.stopping = True
            notifier.send("STOPPING=1")
            log.info("stopping %s; %d live leases stay on disk for the next daemon", why, len(sessions.table))
            nursery.cancel_scope.cancel()


async def _feed_watchdog(notifier: systemd.Notifier, interval: float) -> None:
    while True:
        notifier.send("WATCHDOG=1")
        await trio.sleep(interval)


def _raise_fd_limit() -> None:
    """Each connection and each holder's pidfd is a file descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def serve(config: Config, ready_fd: int | None = None) -> int:
    """Run the daemon in this process until it is stopped; return the exit
    status.  Under systemd, serve on the socket it passes and report
    readiness; otherwise bind ``config.socket``."""
    # A client that finds no control socket asks the lock's holder to bind
    # it again (see .control); until the daemon listens for that, or once
    # it stops, the request must not kill it.
    signal.signal(REBIND_SIGNAL, lambda signum, frame: None)
    try:
        systemd.configure_logging(config.log_level, config.verbose, config.log_file)
    except OSError as err:
        print(f"tractor-session serve: cannot open the log file: {err}", file=sys.stderr)
        return 1
    notifier = systemd.Notifier()
    try:
        activated = systemd.take_listen_socket()
    except RuntimeError as err:
        print(f"tractor-session serve: {err}", file=sys.stderr)
        return 1
    if activated is not None:
        config.socket = Path(activated.getsockname())
    if (too_long := paths.socket_too_long(config.socket) or paths.root_too_long(config.root)) is not None:
        print(f"tractor-session serve: {too_long}", file=sys.stderr)
        return 1
    try:
        paths.ensure_private_dir(config.root)
        paths.ensure_private_dir(config.socket.parent)
        # Keyed on the root, whatever the socket: one daemon per root.
        control_dir = Path(paths.control_dir(config.root))
        paths.ensure_private_dir(control_dir)
        lock_fd = acquire_daemon_lock(control_dir)
        lifetime = Lifetime(config.exit_when_idle)
        sessions = Sessions(config, notifier, lifetime)
    except (AlreadyRunning, paths.UnsafePathError, PortPoolError) as err:
        print(f"tractor-session serve: {err}", file=sys.stderr)
        return 1
    _raise_fd_limit()
    # Everything the daemon creates is owner-only, without a chmod each time.
    os.umask(0o077)
    if activated is not None:
        control = ControlSocket(config.socket, activated, owned=False)
    else:
        control = ControlSocket(config.socket, bind_control_socket(config.socket), owned=True)
    try:
        trio.run(_run, config, sessions, lifetime, control, notifier, ready_fd)
    finally:
        control.remove()
        os.close(lock_fd)
        notifier.close()
    return 0
