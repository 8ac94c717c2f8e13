"""Running under systemd: socket activation, sd_notify and journal logs;
and the daemon's logging wherever it runs (the journal, stderr, or a
rotated file).

The notify and activation protocols are a few lines of stdlib each, so we
speak them directly instead of depending on a binding library.  The unit
files themselves are :mod:`tractor_session.systemd_units`'.
"""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
import socket
import sys
from pathlib import Path

SD_LISTEN_FDS_START = 3
UNIT_NAMES = ("tractor-session.socket", "tractor-session.service")
_ACTIVATION_VARS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def take_listen_socket() -> socket.socket | None:
    """The control socket systemd passed us, if it passed one to *us*.

    The variables are removed from the environment either way, so that
    nothing the daemon spawns believes the fds are meant for it.
    """
    fds = os.environ.get("LISTEN_FDS", "")
    pid = os.environ.get("LISTEN_PID", "")
    for name in _ACTIVATION_VARS:
        os.environ.pop(name, None)
    if not fds.isdigit() or int(fds) < 1 or pid != str(os.getpid()):
        return None
    try:
        sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    except OSError as err:
        raise RuntimeError(f"systemd passed fd 3, but it is not a socket ({err.strerror})") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise RuntimeError("systemd passed fd 3, but it is not a unix stream socket")
    return sock


class Notifier:
    """Sends sd_notify(3) messages; does nothing without ``NOTIFY_SOCKET``."""

    def __init__(self) -> None:
        address = os.environ.pop("NOTIFY_SOCKET", "")
        usec = os.environ.pop("WATCHDOG_USEC", "")
        watchdog_pid = os.environ.pop("WATCHDOG_PID", "")
        self._sock: socket.socket | None = None
        self._address = "\0" + address[1:] if address.startswith("@") else address
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        ours = not watchdog_pid or watchdog_pid == str(os.getpid())
        self.watchdog_interval: float | None = (
            int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and ours else None
        )

    def send(self, *fields: str) -> None:
        if self._sock is None:
            return
        try:
            # Never block the event loop on a manager slow to read: a
            # dropped status or watchdog ping is harmless, a frozen daemon
            # is not.
            self._sock.sendto("\n".join(fields).encode(), socket.MSG_DONTWAIT, self._address)
        except OSError:
            pass

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


# -- logging ----------------------------------------------------------------

_PRIORITY = {
    logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2,
}


class JournalFormatter(logging.Formatter):
    """``<N>message``: the journal adds timestamps itself and reads the
    syslog priority from the prefix, so ``journalctl -p warning`` works."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def stderr_is_journal() -> bool:
    """Whether stderr is connected to the journal (systemd.exec(5))."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


LOG_ROTATE_BYTES = 1 << 20
LEASE_TRAFFIC = "tractor_session.daemon.leases"
"""The logger of every grant and routine release, at INFO."""


class RotatingLog(logging.handlers.RotatingFileHandler):
    """The log file of a daemon that may run for weeks: rotated past
    :data:`LOG_ROTATE_BYTES`, one old copy kept (``PATH.1``), owner-only.

    Whichever of stdout and stderr was this file when the daemon started
    (a daemon started on demand: what it says before logging starts, and
    a traceback) follows it to each new file, rather than writing on into
    the old copy."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, maxBytes=LOG_ROTATE_BYTES, backupCount=1)
        assert self.stream is not None
        ours = os.fstat(self.stream.fileno())
        self._following = [fd for fd in (1, 2) if _is_file(fd, ours)]

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)

    def doRollover(self) -> None:
        super().doRollover()
        if self.stream is not None:
            for fd in self._following:
                os.dup2(self.stream.fileno(), fd)


def _is_file(fd: int, st: os.stat_result) -> bool:
    try:
        mine = os.fstat(fd)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)


def configure_logging(level: str = "info", verbose: bool = False, log_file: Path | None = None) -> None:
    """Log at ``level`` and above to ``log_file`` (rotated), or to stderr:
    in the journal's format when stderr is the journal.

    Grants and routine releases are logged at INFO on :data:`LEASE_TRAFFIC`,
    which stays quiet unless ``verbose`` (or ``level`` is debug): a busy
    test host makes thousands an hour, and grants are the hot path."""
    handler: logging.Handler
    if log_file is not None:
        handler = RotatingLog(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    if log_file is None and stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s tractor-session[%(process)d] %(levelname)s %(message)s"
        ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    threshold = logging.getLevelNamesMapping()[level.upper()]
    root.setLevel(threshold)
    logging.getLogger(LEASE_TRAFFIC).setLevel(
        logging.NOTSET if verbose or threshold <= logging.DEBUG else logging.WARNING
    )
