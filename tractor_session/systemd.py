"""Running under systemd: socket activation, sd_notify, journal logs, units.

The notify and activation protocols are a few lines of stdlib each, so we
speak them directly instead of depending on a binding library.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
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


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s tractor-session[%(process)d] %(levelname)s %(message)s"
        ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


# -- units --------------------------------------------------------------------

SOCKET_UNIT = """\
[Unit]
Description=tractor-session control socket

[Socket]
ListenStream=%t/tractor-session/control.sock
SocketMode=0600
DirectoryMode=0700

[Install]
WantedBy=sockets.target
"""

SERVICE_UNIT = """\
[Unit]
Description=tractor-session daemon: private sessions for tractor runs
Requires=tractor-session.socket
After=tractor-session.socket

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start}
WatchdogSec=30
Restart=on-failure
# No RuntimeDirectory=: a restart must find and re-adopt the live leases
# kept under %t/tractor.

[Install]
WantedBy=default.target
"""


def _quote(arg: str) -> str:
    """Quote one ExecStart= word (systemd.syntax(7)): systemd expands
    ``%`` specifiers and ``$`` variables in it, so both are doubled."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and all(c.isalnum() or c in "/._-+=:,%$" for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exec_start(python: str = sys.executable) -> list[str]:
    """The daemon's command line for this installation."""
    return [python, "-m", "tractor_session", "serve"]


def unit_texts(command: list[str] | None = None) -> dict[str, str]:
    """The two units; ``ExecStart=`` runs ``command`` (default: this
    installation's interpreter)."""
    exec_line = " ".join(_quote(a) for a in (command or exec_start()))
    return {
        "tractor-session.socket": SOCKET_UNIT,
        "tractor-session.service": SERVICE_UNIT.format(exec_start=exec_line),
    }


def user_unit_dir() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user"


def _systemctl(*args: str) -> tuple[bool, str]:
    """Run ``systemctl --user ARGS``; (succeeded, what it said)."""
    if shutil.which("systemctl") is None:
        return False, "systemctl is not installed"
    try:
        done = subprocess.run(
            ["systemctl", "--user", *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, str(err)
    return done.returncode == 0, (done.stderr or done.stdout).strip()


def install(now: bool) -> list[str]:
    """Write the units and tell systemd; return what was done, line by line."""
    unit_dir = user_unit_dir()
    unit_dir.mkdir(parents=True, exist_ok=True)
    said = []
    for name, text in unit_texts().items():
        (unit_dir / name).write_text(text)
        said.append(f"wrote {unit_dir / name}")
    ok, why = _systemctl("daemon-reload")
    if not ok:
        said.append(f"systemctl --user is unavailable ({why}); to enable later, run:")
        said.append("  systemctl --user daemon-reload && systemctl --user enable --now tractor-session.socket")
        return said
    said.append("ran systemctl --user daemon-reload")
    if now:
        ok, why = _systemctl("enable", "--now", "tractor-session.socket")
        said.append(
            "enabled and started tractor-session.socket" if ok
            else f"systemctl --user enable --now tractor-session.socket failed: {why}"
        )
    else:
        said.append("start it with: systemctl --user enable --now tractor-session.socket")
    return said


def uninstall() -> list[str]:
    unit_dir = user_unit_dir()
    said = []
    ok, _ = _systemctl("disable", "--now", *UNIT_NAMES)
    if ok:
        said.append("stopped and disabled tractor-session.socket and .service")
    for name in UNIT_NAMES:
        path = unit_dir / name
        if path.exists():
            path.unlink()
            said.append(f"removed {path}")
    if _systemctl("daemon-reload")[0]:
        said.append("ran systemctl --user daemon-reload")
    if len(said) == 0:
        said.append(f"nothing to do: no units in {unit_dir}")
    return said
