"""The runtime root as a directory fd, and the bindspaces in it.

The daemon opens its root once, at start-up, and from then on makes,
writes, reads and removes bindspaces only relative to that fd (``openat``,
``mkdirat``, ``unlinkat``, each with ``O_NOFOLLOW``): replacing the root's
path with a symlink, or a bindspace with one, changes nothing it does.
The path is only what clients are told (their envelopes name it) and what
people are shown; :meth:`RootDir.moved` says when it no longer leads to
the fd.  ``tractor-session gc`` without a daemon opens the root the same way.

Removal (:func:`remove_bindspace`) is iterative and holds three fds at
most whatever the depth: it goes down by ``openat`` and back up by ``..``,
checking that the directory it comes back to is the one it left.  The
lease record is removed last, so a removal that fails part-way leaves a
directory whose record still says whose it is.

Standard library only: ``gc`` imports this on the light side.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import sys

from tractor_session import paths

RECORD_NAME = ".tractor-session-lease"
BINDSPACE_NAME_RE = re.compile(
    rf"[0-9a-f]{{{paths.BINDSPACE_NAME_LEN}}}|[0-9a-f]{{{paths.LEGACY_BINDSPACE_NAME_LEN}}}"
)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A name that is a symlink or not a directory: removed as itself.
_NOT_A_DIR = (errno.ELOOP, errno.ENOTDIR)
# How often emptied directories may turn out non-empty again before a
# removal gives up (something keeps writing into the tree).
_MAX_REFILLS = 100

Ident = tuple[int, int]


def _ident(st: os.stat_result) -> Ident:
    return st.st_dev, st.st_ino


class RootDir:
    """The runtime root, open.  ``path`` is what it is called, ``fd`` what
    it is."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.ident = _ident(os.fstat(fd))

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> RootDir:
        """Open the (existing) root ``path``, refusing it unless it is a
        directory of ours alone, and the one checked is the one opened."""
        path = os.fspath(path)
        try:
            fd = os.open(path, _DIR_FLAGS)
        except FileNotFoundError:
            raise paths.UnsafePathError(f"{path}: does not exist") from None
        except OSError as err:
            if err.errno in _NOT_A_DIR:
                paths.check_private_dir(path)  # says which
            raise paths.UnsafePathError(f"{path}: cannot open it: {err.strerror}") from None
        root = cls(path, fd)
        try:
            paths.check_private_dir(path)
            if (why := root.moved()) is not None:
                raise paths.UnsafePathError(f"{why}; retry")
        except BaseException:
            root.close()
            raise
        return root

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> RootDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def moved(self) -> str | None:
        """Why ``path`` no longer leads to the directory opened, or None.
        Symlinks count as moved: the root is refused as one at start-up."""
        try:
            st = os.lstat(self.path)
        except OSError as err:
            return f"the runtime root {self.path} is gone ({err.strerror})"
        if _ident(st) == self.ident:
            return None
        what = "a symlink" if stat.S_ISLNK(st.st_mode) else "another directory" if stat.S_ISDIR(st.st_mode) else "something else"
        return f"the runtime root {self.path} was replaced by {what}"

    def path_of(self, name: str) -> str:
        """What the entry ``name`` (a bindspace, say) is called, for clients
        and people."""
        return f"{self.path}/{name}"

    def socket_path(self, name: str) -> str:
        """A path for ``connect()`` that reaches the socket ``name`` in this
        root through its fd (Linux's /proc), not through its path."""
        if sys.platform == "linux" and os.path.isdir(f"/proc/self/fd/{self.fd}"):
            return f"/proc/self/fd/{self.fd}/{name}"
        return self.path_of(name)

    def open_bindspace(self, name: str) -> int:
        """An fd of the bindspace directory ``name`` (never a symlink's
        target).  Close it."""
        return open_dir(name, self.fd)

    def lstat(self, name: str) -> os.stat_result:
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False)

    def has(self, path: str) -> bool:
        """Whether ``path`` (relative to the root) exists, as a link or not."""
        try:
            self.lstat(path)
        except OSError:
            return False
        return True


def open_dir(name: str, dir_fd: int) -> int:
    """Open the directory ``name`` in ``dir_fd``; ``OSError`` (``ELOOP``,
    ``ENOTDIR``) if it is a symlink or not a directory."""
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"{name!r} is not a name in a directory")
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def remove_bindspace(root_fd: int, name: str) -> None:
    """Remove the bindspace ``name`` of the root open as ``root_fd``, its
    record last; a symlink or file in its place is removed as itself.
    Raises ``OSError`` if anything could not be removed."""
    if not BINDSPACE_NAME_RE.fullmatch(name):
        raise ValueError(f"refusing to remove {name!r}: not a bindspace name")
    if (fd := _open_dir_or_unlink(name, root_fd)) is None:
        return
    try:
        clear_dir(fd, keep=RECORD_NAME)
        try:
            _unlink(RECORD_NAME, fd)
        except (IsADirectoryError, PermissionError):  # a directory in its place
            clear_dir(fd)
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=root_fd)
    except FileNotFoundError:
        pass


def _open_dir_or_unlink(name: str, dir_fd: int) -> int | None:
    """The directory ``name`` in ``dir_fd``, open; None if it is gone, or
    was a symlink or a file (swapped in, say) and is unlinked now."""
    try:
        return open_dir(name, dir_fd)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno not in _NOT_A_DIR:
            raise
        _unlink(name, dir_fd)
        return None


def clear_dir(top: int, keep: str | None = None) -> None:
    """Empty the directory open as ``top`` (but for the entry ``keep``),
    depth first and without recursion: a 1,200-level tree costs no stack
    and one fd more than ``top`` (and a scan's)."""
    fd = top
    refilled = 0
    # From ``top`` down to ``fd``: each directory entered, and the identity
    # of the directory it was entered from, checked on the way back up.
    below: list[tuple[str, Ident]] = []
    try:
        while True:
            subdir = _clear_files(fd, keep if fd == top else None)
            if subdir is not None:
                if (child := _open_dir_or_unlink(subdir, fd)) is None:
                    continue
                below.append((subdir, _ident(os.fstat(fd))))
                if fd != top:
                    os.close(fd)
                fd = child
                continue
            if not below:
                return
            emptied, parent_ident = below.pop()
            parent = top if not below else os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            if _ident(os.fstat(fd)) != parent_ident:
                raise OSError(errno.ESTALE, f"a directory was moved while {emptied!r} in it was being removed")
            try:
                os.rmdir(emptied, dir_fd=fd)
            except OSError as err:
                # Filled meanwhile, or an entry was hidden from the pass: the
                # next pass of this directory goes down into it again.
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    raise
                refilled += 1
                if refilled > _MAX_REFILLS:
                    raise
    finally:
        if fd != top:
            os.close(fd)


def _clear_files(fd: int, keep: str | None) -> str | None:
    """Remove every entry of ``fd`` but ``keep`` and non-empty directories;
    return a non-empty subdirectory, or None once none was met.  (An entry a
    concurrent change hid from this pass fails its directory's ``rmdir``.)"""
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.name == keep:
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    os.rmdir(entry.name, dir_fd=fd)
                else:
                    os.unlink(entry.name, dir_fd=fd)
            except FileNotFoundError:
                continue
            except OSError as err:
                if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR):
                    return entry.name
                raise
    return None


def _unlink(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
