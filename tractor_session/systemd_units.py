"""The daemon as a systemd user service: the unit files, and
``tractor-session systemd install|uninstall``.

What the daemon does when systemd runs it (socket activation, sd_notify,
journal logs) is :mod:`tractor_session.daemon.systemd`'.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

UNIT_NAMES = ("tractor-session.socket", "tractor-session.service")


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


class SystemctlError(RuntimeError):
    """``systemctl --user`` failed where the user asked it to act (``--now``);
    ``said`` is what was done before."""

    def __init__(self, message: str, said: list[str]) -> None:
        super().__init__(message)
        self.said = said


ENABLE = "systemctl --user enable --now tractor-session.socket"


def install(now: bool) -> list[str]:
    """Write the units and tell systemd; return what was done, line by line.

    Without ``now``, a user manager that cannot be reached is no failure:
    the units are written and the lines say how to enable them later.  With
    ``now``, the user asked for a running service: :class:`SystemctlError`
    (after the units are written) names what failed and what to do."""
    unit_dir = user_unit_dir()
    unit_dir.mkdir(parents=True, exist_ok=True)
    said = []
    for name, text in unit_texts().items():
        (unit_dir / name).write_text(text)
        said.append(f"wrote {unit_dir / name}")
    ok, why = _systemctl("daemon-reload")
    if ok:
        said.append("ran systemctl --user daemon-reload")
        if not now:
            return [*said, f"start it with: {ENABLE}"]
        ok, why = _systemctl("enable", "--now", "tractor-session.socket")
        if ok:
            return [*said, "enabled and started tractor-session.socket"]
    elif not now:
        return [*said, f"systemctl --user is unavailable ({why}); to enable later, run:",
                f"  systemctl --user daemon-reload && {ENABLE}"]
    raise SystemctlError(
        f"the units are written, but systemctl --user failed: {why}. Without a user manager"
        " (no login session, as over su or in a container), run `loginctl enable-linger $USER`"
        f" or log in, then: systemctl --user daemon-reload && {ENABLE}",
        said,
    )


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
