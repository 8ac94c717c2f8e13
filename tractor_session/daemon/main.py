"""Start-up and shut-down of the daemon.

:func:`serve` takes the one-daemon-per-root lock, binds the control socket
(or takes the one systemd passes), composes the sessions and the server,
and runs them under trio until SIGTERM, SIGINT, a ``stop`` request or
(if asked) a long enough idle stretch (:mod:`.lifetime`).  Stopping keeps
every live lease on disk for the next daemon to re-adopt.
"""

from __future__ import annotations

import fcntl
import logging
import os
import resource
import signal
import socket
import sys
from pathlib import Path

import trio

from tractor_session import paths
from tractor_session.daemon import systemd
from tractor_session.daemon.config import Config
from tractor_session.daemon.lifetime import Lifetime
from tractor_session.daemon.ports import PortPoolError
from tractor_session.daemon.server import Server
from tractor_session.daemon.sessions import Sessions

log = logging.getLogger("tractor_session.daemon")


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
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise AlreadyRunning(
            f"another tractor-session daemon (pid {holder}) is already running"
            f" for {control_dir}; stop it first or use it"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _bind_control_socket(path: Path) -> socket.socket:
    """Bind the control socket owner-only.  Called under the daemon lock, so
    a socket file already there is a dead daemon's and safe to replace."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(socket.SOMAXCONN)
    return sock


async def _run(
    config: Config, sessions: Sessions, lifetime: Lifetime, sock: socket.socket,
    notifier: systemd.Notifier, ready_fd: int | None,
) -> None:
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    server = Server(config, sessions, lifetime)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(sessions.run)
            nursery.start_soon(server.serve, listener)
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
        control = Path(paths.control_dir(config.root))
        paths.ensure_private_dir(control)
        lock_fd = acquire_daemon_lock(control)
        lifetime = Lifetime(config.exit_when_idle)
        sessions = Sessions(config, notifier, lifetime)
    except (AlreadyRunning, paths.UnsafePathError, PortPoolError) as err:
        print(f"tractor-session serve: {err}", file=sys.stderr)
        return 1
    _raise_fd_limit()
    # Everything the daemon creates is owner-only, without a chmod each time.
    os.umask(0o077)
    sock = activated if activated is not None else _bind_control_socket(config.socket)
    try:
        trio.run(_run, config, sessions, lifetime, sock, notifier, ready_fd)
    finally:
        # systemd owns an activated socket's file: it must outlive us.
        if activated is None:
            try:
                os.unlink(config.socket)
            except FileNotFoundError:
                pass
        os.close(lock_fd)
        notifier.close()
    return 0
