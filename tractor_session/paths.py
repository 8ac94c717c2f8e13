"""Where everything lives on disk, and the checks that make it safe to use.

Layout (Linux defaults; ``TRACTOR_SESSION_ROOT`` moves all of it)::

    $XDG_RUNTIME_DIR/tractor/                 runtime root: tractor's own
        <4 hex>/                              one bindspace per live session
            tractor/                          where tractor binds its sockets
    $XDG_RUNTIME_DIR/tractor-session/         our control directory
        control.sock  daemon.lock  spawn.lock  daemon.log

The runtime root is exactly the directory tractor itself uses by default,
so that garbage collection can also clean tractor's shared bindspace.  The
control directory sits beside it, never among the bindspaces, and is
always ``<root>-session`` so one override moves both.

Paths here are strings, not ``pathlib.Path``: the client imports this module
on the hot path of every test run, and pathlib costs it ~4 ms to import.
"""

from __future__ import annotations

import os
import stat
import sys

from tractor_session.envelope import ROOT_ENV, SOCKET_ENV

CONTROL_SOCKET_NAME = "control.sock"
DAEMON_LOCK_NAME = "daemon.lock"
SPAWN_LOCK_NAME = "spawn.lock"
DAEMON_LOG_NAME = "daemon.log"

DEEPEST_SOCKET_NAME = f"actor.{'0' * 32}@{'9' * 7}.sock"
"""The longest socket name tractor may create in a bindspace: a compacted
actor name and a 7-digit pid."""


# sun_path is 108 bytes on Linux and 104 on macOS, NUL terminator included.
AF_UNIX_PATH_MAX = 104 if sys.platform == "darwin" else 108


class UnsafePathError(RuntimeError):
    """A directory we are about to use could be controlled by someone else."""


def runtime_root(environ: os._Environ[str] | dict[str, str] = os.environ) -> str:
    """The directory tractor binds its sockets in by default.

    tractor computes ``platformdirs.user_runtime_dir()/tractor`` on Linux and
    ``/tmp/tractor-<uid>`` on macOS.  Hosts without a user runtime dir
    (containers, CI, ``su``) get recent platformdirs' own fallback,
    ``<tmp>/runtime-<uid>``, which we create owner-only and announce once.
    """
    if override := environ.get(ROOT_ENV):
        return override
    uid = os.getuid()
    if sys.platform == "darwin":
        return f"/tmp/tractor-{uid}"
    if xdg := environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(_checked_xdg(xdg), "tractor")
    run_user = f"/run/user/{uid}"
    if os.path.isdir(run_user):
        return os.path.join(run_user, "tractor")
    import tempfile  # only here: it costs the hot path a few ms to import

    fallback = os.path.join(tempfile.gettempdir(), f"runtime-{uid}")
    if not os.path.lexists(fallback):
        print(
            f"tractor-session: no /run/user/{uid} and XDG_RUNTIME_DIR is unset;"
            f" using {fallback} (owner-only) as the runtime dir",
            file=sys.stderr,
        )
    # Checked every time: it sits in a world-writable directory.
    ensure_private_dir(fallback)
    return os.path.join(fallback, "tractor")


def _checked_xdg(xdg: str) -> str:
    """``XDG_RUNTIME_DIR``, if it is what the XDG spec promises (absolute,
    a directory, the user's own); otherwise an error that says what to do.
    Never created here: it is the login session's to make, and tractor,
    computing its own directory from it, would go elsewhere."""
    fix = (
        "set XDG_RUNTIME_DIR to your own runtime directory (normally /run/user/<uid>,"
        " made by your login session), or unset it"
    )
    if not os.path.isabs(xdg):
        raise UnsafePathError(f"XDG_RUNTIME_DIR={xdg!r} is a relative path, and must be absolute: {fix}")
    try:
        st = os.stat(xdg)
    except FileNotFoundError:
        raise UnsafePathError(f"XDG_RUNTIME_DIR={xdg} does not exist: {fix} (or `mkdir -m 700 {xdg}`)") from None
    except OSError as err:
        raise UnsafePathError(f"XDG_RUNTIME_DIR={xdg}: {err.strerror}: {fix}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"XDG_RUNTIME_DIR={xdg} is not a directory: {fix}")
    if st.st_uid != os.getuid():
        raise UnsafePathError(f"XDG_RUNTIME_DIR={xdg} is owned by uid {st.st_uid}, not by you (uid {os.getuid()}): {fix}")
    return xdg


SHORT_NAME_LEN = 12
"""How many hex digits of a lease id ``status`` shows: enough to tell any
two leases apart at a glance, and to type."""

BINDSPACE_NAME_LEN = 4
"""How many hex digits of a lease id name its bindspace.  Every byte here
is a byte less for the runtime root (see :data:`ROOT_BUDGET`), so it is as
short as it can be while 65,536 names keep collisions rare: the daemon
draws another id when a name is taken."""

LEGACY_BINDSPACE_NAME_LEN = 12
"""The bindspace name length of versions before the budget was widened; a
daemon still re-adopts, and gc still collects, bindspaces named so."""

ROOT_BUDGET = AF_UNIX_PATH_MAX - 1 - len(f"/{'0' * BINDSPACE_NAME_LEN}/tractor/{DEEPEST_SOCKET_NAME}")
"""The longest runtime root, in bytes, under which every socket tractor
binds in a bindspace fits AF_UNIX (42 on Linux, 38 on macOS)."""


def short_name(lease_id: str) -> str:
    """How ``status`` shows a lease: the first 12 hex digits of its id."""
    return lease_id.replace("-", "")[:SHORT_NAME_LEN]


def bindspace_name(lease_id: str) -> str:
    """The name of a lease's bindspace: the first 4 hex digits of its id, so
    the short id ``status`` shows begins with it."""
    return lease_id.replace("-", "")[:BINDSPACE_NAME_LEN]


def bindspace_names(lease_id: str) -> tuple[str, str]:
    """The names a bindspace of ``lease_id`` may have: this version's, and
    the legacy one."""
    digits = lease_id.replace("-", "")
    return digits[:BINDSPACE_NAME_LEN], digits[:LEGACY_BINDSPACE_NAME_LEN]


def control_dir(root: str | os.PathLike[str]) -> str:
    """The daemon's own directory: a sibling of the runtime root."""
    return os.fspath(root).rstrip("/") + "-session"


def control_socket(environ: os._Environ[str] | dict[str, str] = os.environ) -> str:
    """The socket clients connect to: the envelope's, else the default."""
    if path := environ.get(SOCKET_ENV):
        return path
    return os.path.join(control_dir(runtime_root(environ)), CONTROL_SOCKET_NAME)


def ensure_private_dir(path: str | os.PathLike[str]) -> None:
    """Create ``path`` mode 0700 if missing, then refuse it if it is unsafe.

    A symlink, a directory of another user or one others can write to would
    let them redirect or plant sockets in our sessions (and make platformdirs
    fall back to a different directory in some processes: a split brain).
    """
    try:
        if parent := os.path.dirname(os.fspath(path).rstrip("/")):
            os.makedirs(parent, 0o700, exist_ok=True)
        os.mkdir(path, 0o700)
        # mkdir honours the umask; make sure the mode is what we promise.
        os.chmod(path, 0o700)
    except FileExistsError:
        pass
    except OSError as err:
        raise UnsafePathError(f"{path}: cannot create it: {err.strerror}") from None
    check_private_dir(path)


def check_private_dir(path: str | os.PathLike[str]) -> None:
    """Raise :class:`UnsafePathError` naming ``path`` unless it is ours alone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise UnsafePathError(f"{path}: does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(
            f"{path}: is a symlink; refusing to use it (remove it and retry)"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{path}: is not a directory")
    if st.st_uid != os.getuid():
        raise UnsafePathError(
            f"{path}: is owned by uid {st.st_uid}, not by you (uid {os.getuid()})"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePathError(
            f"{path}: is writable by others (mode {stat.S_IMODE(st.st_mode):04o});"
            f" run `chmod 700 {path}`"
        )


def fits_af_unix(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` can be bound as a unix socket on this platform."""
    return len(os.fsencode(path)) < AF_UNIX_PATH_MAX


def root_too_long(root: str | os.PathLike[str]) -> str | None:
    """Why tractor's sockets would not fit under ``root``, or None."""
    length = len(os.fsencode(root))
    if length <= ROOT_BUDGET:
        return None
    return (
        f"the runtime root {os.fspath(root)} is {length} bytes long, and tractor's socket paths in a"
        f" bindspace under it would pass AF_UNIX's {AF_UNIX_PATH_MAX}-byte limit: the root may be at"
        f" most {ROOT_BUDGET} bytes. Set {ROOT_ENV} to a shorter directory (e.g. /tmp/ts-{os.getuid()})."
    )


def socket_too_long(path: str | os.PathLike[str]) -> str | None:
    """Why the control socket ``path`` cannot be bound or reached, or None."""
    if fits_af_unix(path):
        return None
    return (
        f"the control socket path {os.fspath(path)} is {len(os.fsencode(path))} bytes long; AF_UNIX"
        f" allows at most {AF_UNIX_PATH_MAX - 1}. Set {ROOT_ENV} (or {SOCKET_ENV}) to a shorter path."
    )
