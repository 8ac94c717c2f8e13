"""Talking to the user's shell: ``lease --export`` and ``release --export``.

``eval "$(tractor-session lease --export)"`` puts a session into the
shell that evaluates it, the way ``ssh-agent`` does.  Two things make that
harder than printing ``export`` lines:

- The lease must last as long as *that shell*, yet our parent may be a
  moment-long subshell: a command substitution holding a pipeline
  (``$(tractor-session lease --export | cat)``) forks the shell and runs us
  under the fork.  Bound to the fork, the lease would end at once and the
  shell's next child, carrying the envelope, would be reaped as a leftover.
  :func:`calling_shell` walks up past such forks.
- ``release --export`` must put the shell back as it was, including any
  variable the envelope replaced (``XDG_RUNTIME_DIR`` above all), whose
  old value the daemon never knew: the export saves those in
  :data:`SAVED_ENV`.

Standard library only: this runs in the CLI process.
"""

from __future__ import annotations

import os
import shlex

from tractor_session import envelope

SAVED_ENV = "TRACTOR_SESSION_SAVED_ENV"
"""What ``lease --export`` replaced in the shell, as ``NAME=value`` words
(shell-quoted), so that ``release --export`` can restore it."""


def export_lines(session_env: dict[str, str], environ: dict[str, str] | os._Environ[str]) -> str:
    """Shell lines that put ``session_env`` into the evaluating shell
    (whose environment ``environ`` is), saving what they replace."""
    lines = [f"export {name}={shlex.quote(value)}" for name, value in sorted(session_env.items())]
    # In a shell already inside an exported session, the first save holds
    # what the shell had before any session.
    if SAVED_ENV not in environ:
        replaced = [f"{name}={environ[name]}" for name in sorted(session_env) if name in environ]
        lines.append(f"export {SAVED_ENV}={shlex.quote(shlex.join(replaced))}")
    return "\n".join(lines)


def unset_lines(environ: dict[str, str] | os._Environ[str]) -> str:
    """Shell lines that take a session's variables out of the evaluating
    shell (whose environment ``environ`` is) and restore what the export
    replaced, like ``ssh-agent -k``."""
    words = shlex.split(environ.get(SAVED_ENV, ""))
    saved = {name: value for name, _, value in (word.partition("=") for word in words)}
    lines = [f"unset {name}" for name in (*envelope.SESSION_VARS, SAVED_ENV) if name in environ and name not in saved]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in sorted(saved.items())]
    return "\n".join(lines)


def calling_shell() -> int:
    """The pid of the shell that will evaluate our output: our parent, or
    above it, past the forks of a command substitution.

    A fork the shell made to run a substitution is the same program with
    the same command line, in the same process group as the shell (job
    control gives a separately started shell a group of its own).  Without
    ``/proc`` (not Linux) our parent is the best answer there is.
    """
    pid = os.getppid()
    while (parent := _parent(pid)) > 1 and _is_fork_of(pid, parent):
        pid = parent
    return pid


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    # After the command name, which may hold spaces and parentheses.
    return int(stat[stat.rindex(b")") + 2:].split()[1])


def _is_fork_of(pid: int, parent: int) -> bool:
    try:
        if os.getpgid(pid) != os.getpgid(parent):
            return False
        if os.readlink(f"/proc/{pid}/exe") != os.readlink(f"/proc/{parent}/exe"):
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as mine, open(f"/proc/{parent}/cmdline", "rb") as theirs:
            return mine.read() == theirs.read()
    except OSError:
        return False
