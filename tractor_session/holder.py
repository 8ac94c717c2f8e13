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

``tractor-session exec`` brings a command into such a network later: its
child joins the holder's user and network namespaces
(:func:`open_session_network`, :func:`join_network`).

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


def open_session_network(pid: int | None, netns: int | None) -> tuple[int, int]:
    """Open the user and network namespaces of the session's holder ``pid``
    (which :func:`join_network` enters), checked to be the session's
    network ``netns``: a reused pid's would not be.  Opened here, in the
    process that can still report why it cannot, and held open so that
    the holder ending meanwhile changes nothing."""
    if netns is None or pid is None:
        raise PrivateNetworkError(
            "the session's private network is not up yet (its command has not started); retry in a moment"
        )
    fds: list[int] = []
    why = "it is no longer in that network"
    try:
        for kind in ("user", "net"):
            fds.append(os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY))
        if os.fstat(fds[1]).st_ino == netns:
            return fds[0], fds[1]
    except OSError as err:
        why = err.strerror or str(err)
    for fd in fds:
        os.close(fd)
    raise PrivateNetworkError(
        f"cannot reach the session's private network through its holder, pid {pid}: {why}."
        " The session is probably ending; see `tractor-session status`."
    )


def join_network(user_fd: int, net_fd: int) -> None:
    """Enter the namespaces :func:`open_session_network` opened: the user
    namespace first, which owns the network one and grants the right to
    enter it.  setns(2) refuses a user namespace to a process with threads:
    run this in a fresh child, between fork and exec.  One already inside
    (``exec`` run from within the session) stays: it may lack the
    capability to re-enter."""
    for fd, kind, nstype in ((user_fd, "user", CLONE_NEWUSER), (net_fd, "net", CLONE_NEWNET)):
        if os.fstat(fd).st_ino != os.stat(f"/proc/self/ns/{kind}").st_ino:
            _setns(fd, nstype)


def _setns(fd: int, nstype: int) -> None:
    if hasattr(os, "setns"):  # Python 3.12
        os.setns(fd, nstype)
        return
    import ctypes

    if _libc().setns(fd, nstype) != 0:  # type: ignore[attr-defined]
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


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
