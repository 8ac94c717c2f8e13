"""The control socket, and keeping it reachable.

The daemon binds it owner-only under the daemon lock (so a file already
at its path is a dead daemon's, safe to replace), or takes the one systemd
passes.  If its file is deleted or replaced while the daemon runs, no
client can reach the daemon, and no other daemon can start either, since
this one holds the lock: a headless daemon.  So a client that finds no
socket while the lock is held sends the lock's holder
:data:`~tractor_session.autostart.REBIND_SIGNAL`
(:func:`tractor_session.autostart.reach_headless_daemon`); the daemon then
checks its socket's file and, if it is not the one it listens on, binds
it again and accepts there.  Open connections, and the leases bound to
them, are not touched.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

import trio

from tractor_session.autostart import REBIND_SIGNAL

log = logging.getLogger("tractor_session.daemon")

BACKLOG = 256
"""How many connections may wait for the daemon to accept them.  A flood
(another user's, say) keeps the queue full; a client then waits for room
(:func:`tractor_session.client.open_socket`) and, once in, behind this
many at most, not the kernel's maximum (4096: seconds, in a flood)."""
OnAccept = Callable[[trio.SocketStream], None]
# Out of file descriptors or memory: wait, then accept again (as trio's
# serve_listeners does).
_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def bind_control_socket(path: Path) -> socket.socket:
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
    sock.listen(BACKLOG)
    return sock


def _identity(path: Path) -> tuple[int, int] | None:
    """What tells the file at ``path`` from another one put there later."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class ControlSocket:
    """The listening socket at ``path``.  ``owned``: bound by this daemon
    (not passed by systemd), so its file is removed when the daemon stops."""

    def __init__(self, path: Path, sock: socket.socket, owned: bool) -> None:
        self.path = path
        self.sock = sock
        self.owned = owned
        self._identity = _identity(path)

    def is_in_place(self) -> bool:
        """Whether the file at ``path`` is still the socket we listen on."""
        return self._identity is not None and _identity(self.path) == self._identity

    async def serve(self, on_accept: OnAccept) -> None:
        """Accept connections, each handed to ``on_accept`` (which must not
        block), until cancelled; on :data:`REBIND_SIGNAL`, bind again if
        need be."""
        with trio.open_signal_receiver(REBIND_SIGNAL) as signals:
            while True:
                listener = trio.SocketListener(trio.socket.from_stdlib_socket(self.sock))
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(self._accept, listener, on_accept)
                    async for _ in signals:
                        if self._rebind():
                            break
                    # Closes the old listener; what waited in its queue is
                    # lost, as it would be on a restart.
                    accepting.cancel_scope.cancel()

    @staticmethod
    async def _accept(listener: trio.SocketListener, on_accept: OnAccept) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as err:
                    if err.errno not in _CAPACITY_ERRNOS:
                        raise
                    log.error("cannot accept a connection (%s); retrying in 0.1 s", err.strerror)
                    await trio.sleep(0.1)
                else:
                    on_accept(stream)

    def _rebind(self) -> bool:
        """Bind a new socket at ``path`` unless the file there is ours;
        whether it did."""
        if self.is_in_place():
            return False
        try:
            sock = bind_control_socket(self.path)
        except OSError as err:
            log.error("the control socket %s is gone and cannot be bound again: %s", self.path, err)
            return False
        self.sock, self.owned, self._identity = sock, True, _identity(self.path)
        log.warning("the control socket %s was deleted or replaced; bound it again", self.path)
        return True

    def remove(self) -> None:
        """At exit: remove the socket's file if we bound it and it is still
        ours (systemd owns an activated socket's file: it must outlive us)."""
        if self.owned and self.is_in_place():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
