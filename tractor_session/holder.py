"""What a session's holder does to its own process before it starts CMD.

Two things, both Linux, both inherited by everything CMD starts:

- **It becomes a child subreaper** (``PR_SET_CHILD_SUBREAPER``).  tractor's
  subactors rewrite their process title, which blanks the environment
  another process reads in ``/proc/<pid>/environ``: once such a subactor's
  parent dies it would be re-parented to init and nothing would tie it to
  its session any more.  With the holder as subreaper, orphans come back
  to the holder instead, and the daemon reaps the holder's descendants
  with the session (see :mod:`tractor_session.procs`).
- **Opt-in, it enters a private network** (``--net private``): a new
  network namespace with only the loopback interface, up, made without
  root through an unprivileged user namespace that maps the user to
  itself.  Inside, ``127.0.0.1:1616``, tractor's default registry, belongs
  to this session alone, so unmodified tractor programs on TCP defaults are
  isolated too.  Path-based unix sockets (the daemon's, the bindspace's)
  work across network namespaces; the host's loopback services do not.

``ctypes`` is imported only here, when a holder starts: it costs a few
milliseconds, and ``os.unshare`` exists only from Python 3.12 on.
"""

from __future__ import annotations

import errno
import os
import sys

PR_SET_CHILD_SUBREAPER = 36
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


class PrivateNetworkError(RuntimeError):
    """A private network cannot be made here; the message names the cause
    and the fix."""


def _libc() -> object:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def become_subreaper() -> None:
    """Have orphaned descendants re-parented to this process, not init.
    Best effort: a system without it only loses that safety net."""
    if sys.platform.startswith("linux"):
        _libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # type: ignore[attr-defined]


def network_namespace(pid: int | str = "self") -> int | None:
    """The inode naming ``pid``'s network namespace, or None if unknown."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def enter_private_network() -> None:
    """Move this (single-threaded) process into a new user and network
    namespace, the user mapped to itself, loopback up."""
    if not sys.platform.startswith("linux"):
        raise PrivateNetworkError(
            f"--net private needs Linux network namespaces; {sys.platform} has none."
            " Run without --net private (the session then shares the host's network)."
        )
    uid, gid = os.geteuid(), os.getegid()
    if hasattr(os, "unshare"):
        try:
            os.unshare(CLONE_NEWUSER | CLONE_NEWNET)
        except OSError as err:
            raise PrivateNetworkError(_why_unshare_failed(err.errno or 0)) from None
    else:
        import ctypes

        if _libc().unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:  # type: ignore[attr-defined]
            raise PrivateNetworkError(_why_unshare_failed(ctypes.get_errno()))
    try:
        # An unprivileged process may map only itself, and only once it
        # gave up setgroups(2).
        _write_proc("setgroups", "deny")
        _write_proc("uid_map", f"{uid} {uid} 1")
        _write_proc("gid_map", f"{gid} {gid} 1")
        _loopback_up()
    except OSError as err:
        raise PrivateNetworkError(f"could not set up the private network: {err}") from None


def _write_proc(name: str, text: str) -> None:
    fd = os.open(f"/proc/self/{name}", os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _loopback_up() -> None:
    """``ip link set lo up``, without needing ``ip``: the kernel gives a new
    namespace's ``lo`` its 127.0.0.1 and ::1 as soon as it is up."""
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = struct.pack("16sh22x", b"lo", 0)
        flags = struct.unpack("16sh22x", fcntl.ioctl(sock, _SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sh22x", b"lo", flags | _IFF_UP))


def _read_sysctl(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _why_unshare_failed(code: int) -> str:
    """What stops unprivileged user namespaces here, and how to lift it."""
    base = "--net private needs an unprivileged user namespace, and this system refuses one"
    if code == errno.EINVAL:
        return (
            "--net private must be set up before this process starts threads;"
            " run the command under `tractor-session lease --net private -- ...` instead"
        )
    if _read_sysctl("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        return (
            f"{base}: kernel.unprivileged_userns_clone is 0. Allow it with"
            " `sudo sysctl -w kernel.unprivileged_userns_clone=1`, or run without --net private."
        )
    if _read_sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        return (
            f"{base}: AppArmor restricts unprivileged user namespaces"
            " (kernel.apparmor_restrict_unprivileged_userns=1, Ubuntu's default). Allow them with"
            " `sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0` or an AppArmor"
            " profile granting `userns` to this Python, or run without --net private."
        )
    limit = _read_sysctl("/proc/sys/user/max_user_namespaces")
    if code == errno.ENOSPC or limit == "0":
        return (
            f"{base}: user.max_user_namespaces is {limit} (or its count is used up)."
            " Raise it with `sudo sysctl -w user.max_user_namespaces=15000`,"
            " or run without --net private."
        )
    if code in (errno.EPERM, errno.ENOSYS):
        return (
            f"{base} ({os.strerror(code)}). Inside a container, its seccomp profile"
            " usually forbids unshare(2): allow it (e.g. `--security-opt seccomp=unconfined`),"
            " or run without --net private."
        )
    return f"{base}: unshare(2) failed: {os.strerror(code)}"
