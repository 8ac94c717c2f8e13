"""The ``tractor-session`` command line: parsing, and what runs which command.

The commands themselves are in :mod:`tractor_session.commands`.  Parsing
sits on the hot path of every test run (``lease -- CMD``), so only the
parser of the subcommand named is built.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Sequence

from tractor_session import envelope, paths
from tractor_session.client import ClientError
from tractor_session.commands import (
    PROG,
    UsageError,
    cmd_exec,
    cmd_gc,
    cmd_lease,
    cmd_ps,
    cmd_release,
    cmd_renew,
    cmd_serve,
    cmd_status,
    cmd_stop,
    cmd_systemd,
    fail,
    show_version,
)

TYPE_CHECKING = False  # see client.py
if TYPE_CHECKING:
    _Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]
    from argparse import _FormatterClass as _Format


def _positive(convert: type[int] | type[float], zero: bool = False) -> Callable[[str], int | float]:
    """An argparse type: a finite number above zero (or zero too)."""
    def parse(text: str) -> int | float:
        value = convert(text)
        if not (value >= 0 if zero else value > 0) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a {'non-negative' if zero else 'positive'} number, not {text}")
        return value
    parse.__name__ = convert.__name__
    return parse


class _Version(argparse.Action):
    """``--version``: this client's version and the running daemon's, then
    exit; argparse's own action prints one fixed string."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
        values: str | Sequence[object] | None, option_string: str | None = None,
    ) -> None:
        parser.exit(show_version())


# -- parser ---------------------------------------------------------------------


def _terminal_columns() -> int:
    """What ``shutil.get_terminal_size`` answers, told to argparse's
    formatter: otherwise every ``add_argument`` (argparse formats each one
    to check it) imports ``shutil``, and with it bz2, lzma and zlib,
    milliseconds on the hot path of every test run."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.__stdout__ else 80
    except (OSError, ValueError):
        return 80


def _parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser; with only the subcommand ``argv`` names, when it names
    one: building all of them costs ~10 ms, on the hot path of every test
    run (argparse looks up translations for each)."""
    fmt = functools.partial(argparse.RawDescriptionHelpFormatter, width=_terminal_columns() - 2)
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=fmt,
        description="Give each tractor test run or script a private, self-cleaning session:"
        " its own id, socket directory (bindspace), registry address and environment.",
        epilog="examples:\n"
        "  tractor-session lease -- pytest tests/     run pytest in a fresh session\n"
        "  tractor-session status                     list live sessions\n"
        "\nThe daemon starts on demand; see `tractor-session serve --help`.",
    )
    parser.add_argument("--version", action=_Version, help="show this version and the running daemon's, and exit")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", required=True)
    wanted = [argv[0]] if argv and argv[0] in _COMMANDS else list(_COMMANDS)
    for name in wanted:
        _COMMANDS[name](sub, fmt)
    # A usage error inside a subcommand shows that subcommand's usage.
    for subparser in sub.choices.values():
        subparser.set_defaults(parser=subparser)
    return parser


def _add_lease(sub: _Subparsers, fmt: _Format) -> None:
    p = sub.add_parser(
        "lease", formatter_class=fmt,
        help="run a command in a new session (or print one with --export)",
        description="Take a lease on a new session and run CMD inside it: CMD gets the\n"
        "envelope (_TRACTOR_RT_VARS, XDG_RUNTIME_DIR=<bindspace>, ...) in its\n"
        "environment, signals (INT, TERM, HUP) are passed on, and the session is\n"
        "cleaned up when CMD ends. Exits with CMD's status (128+N if killed by N),\n"
        "125 if the session could not be set up and CMD never ran, or 124 if the\n"
        "session was ended under CMD (say, `tractor-session release` from elsewhere),\n"
        "which ends CMD too; `lease` then says why.\n"
        "With --export, print the envelope as shell exports and return at once;\n"
        "that lease lasts as long as --holder-pid (default: the calling shell).",
        epilog="examples:\n"
        "  tractor-session lease -- pytest -x tests/\n"
        "  tractor-session lease --tpt-proto uds -- python my_script.py\n"
        "  tractor-session lease --net private -- pytest tests/   # TCP defaults isolated too\n"
        "  eval \"$(tractor-session lease --export)\"",
    )
    p.add_argument("--tpt-proto", choices=("tcp", "uds"), default="tcp",
                   help="the registry transport (default: tcp)")
    p.add_argument("--net", choices=("host", "private"), default="host",
                   help="private: run CMD in a network of the session's own (Linux): only"
                   " loopback, so tractor's default registry 127.0.0.1:1616 is the session's"
                   " alone; services on the host's loopback are out of reach (default: host)")
    p.add_argument("--no-xdg", action="store_true",
                   help="do not point XDG_RUNTIME_DIR at the bindspace")
    p.add_argument("--no-reap", action="store_true",
                   help="leave the session's leftover processes running when it ends")
    printed = p.add_mutually_exclusive_group()
    printed.add_argument("--export", action="store_true", help="print `export` lines and return")
    printed.add_argument("--json", action="store_true", help="print the lease as JSON and return")
    p.add_argument("--holder-pid", type=int, metavar="PID",
                   help="with --export: the process whose life bounds the lease (default: the"
                   " shell that evaluates the output, past the subshells of $(...))")
    p.add_argument("--ttl", type=_positive(float), metavar="SECONDS",
                   help="with --export: end the lease after SECONDS unless renewed")
    p.add_argument("--parent", metavar="ID", help=argparse.SUPPRESS)
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    p.set_defaults(func=cmd_lease)


def _add_status(sub: _Subparsers, fmt: _Format) -> None:
    p = sub.add_parser(
        "status", formatter_class=fmt, help="list the live leases",
        description="List every live lease: short id, age, time left of a --ttl lease,\n"
        "network (host, or a private one of the session's own), registry address,\n"
        "and the holder's pid and command; a lease taken inside another session\n"
        "(or by an xdist worker) is shown under it. With ID, everything about that\n"
        "lease. With no daemon running there are no leases: `--json` prints [].",
        epilog="examples:\n  tractor-session status\n  tractor-session status 3f2a\n"
        "  tractor-session status --json | jq '.[].bindspace'",
    )
    p.add_argument("lease_id", metavar="ID", nargs="?", help="a lease id, or any unique prefix of one")
    p.add_argument("--json", action="store_true", help="machine-readable output: a list of leases, or with ID one")
    p.set_defaults(func=cmd_status)


def _add_release(sub: _Subparsers, fmt: _Format) -> None:
    p = sub.add_parser(
        "release", formatter_class=fmt, help="end a lease by id",
        description="End a lease now: reap its leftover processes, remove its bindspace, free its port.\n"
        "Without ID, the session this shell is in ($TRACTOR_SESSION_ID).\n"
        "With --export, also print the lines that take the session out of the\n"
        "shell and restore what `lease --export` replaced, like `ssh-agent -k`.",
        epilog="examples:\n  tractor-session release 3f2a\n  eval \"$(tractor-session release --export)\"",
    )
    p.add_argument("lease_id", metavar="ID", nargs="?", help="a lease id, or any unique prefix of one")
    p.add_argument("--export", "--unset", action="store_true",
                   help="print `unset`/`export` lines that restore the shell")
    p.set_defaults(func=cmd_release)


def _add_renew(sub: _Subparsers, fmt: _Format) -> None:
    p = sub.add_parser(
        "renew", formatter_class=fmt, help="extend a --ttl lease",
        description="Push a time-limited lease's expiry SECONDS into the future.",
        epilog="example:\n  tractor-session renew 3f2a9c1b7d4e --ttl 600",
    )
    p.add_argument("lease_id", metavar="ID", help="a lease id, or any unique prefix of one")
    p.add_argument("--ttl", type=_positive(float), metavar="SECONDS", help="new time to live (default: the lease's own)")
    p.set_defaults(func=cmd_renew)


def _add_ps(sub: _Subparsers, fmt: _Format) -> None:
    p = sub.add_parser(
        "ps", formatter_class=fmt, help="show a session's processes and sockets",
        description="Show what runs in a live session, as a tree under the process that\n"
        "holds the lease: the processes the daemon would reap when the session\n"
        "ends, each with its name and its command line, which is where tractor's\n"
        "actors write their names. Then the socket files in the bindspace, and\n"
        "whether anything listens on each.",
        epilog="examples:\n  tractor-session ps 3f2a\n  tractor-session ps 3f2a --json | jq '.processes[].cmdline'",
    )
    p.add_argument("lease_id", metavar="ID", help="a lease id, or any unique prefix of one")
    p.add_argument("--json", action="store_true", help="machine-readable output: the lease, processes and sockets")
    p.set_defaults(func=cmd_ps)


def _add_exec(sub: _Subparsers, fmt: _Format) -> None:
    p = sub.add_parser(
        "exec", formatter_class=fmt, help="run a command inside a live session",
        description="Run CMD inside a live session, as one of its own: with its envelope\n"
        "(_TRACTOR_RT_VARS, XDG_RUNTIME_DIR=<bindspace>, ...) and, if the session\n"
        "has a private network, in that network. CMD is ended with the session;\n"
        "it does not keep the session alive. Exits with CMD's status (128+N if\n"
        "killed by N), 125 if the session cannot be found or joined and CMD never\n"
        "ran, 124 if the session ended under CMD, 126/127 if CMD cannot be run.",
        epilog="examples:\n  tractor-session exec 3f2a -- python attach_client.py\n"
        "  tractor-session exec 3f2a -- sh      # a shell inside the session",
    )
    p.add_argument("lease_id", metavar="ID", help="a lease id, or any unique prefix of one")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    p.set_defaults(func=cmd_exec)


def _add_gc(sub: _Subparsers, fmt: _Format) -> None:
    p = sub.add_parser(
        "gc", formatter_class=fmt, help="remove what dead sessions left behind",
        description="Remove stale bindspaces (their holder is dead, or they have no lease\n"
        "record and are older than the grace period), sockets in tractor's shared\n"
        "bindspace that nobody listens on, and leftover processes of dead sessions.\n"
        "Works through the daemon when one runs, directly otherwise.",
        epilog="examples:\n  tractor-session gc --dry-run\n  tractor-session gc --json --grace 0",
    )
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.add_argument("--json", action="store_true", help="print the items as a JSON list")
    p.add_argument("--grace", type=_positive(float, zero=True), metavar="SECONDS",
                   help="age below which a directory without a record is spared"
                   " (default: the daemon's --gc-grace, 300 without a daemon)")
    p.set_defaults(func=cmd_gc)


def _add_serve(sub: _Subparsers, fmt: _Format) -> None:
    p = sub.add_parser(
        "serve", formatter_class=fmt, help="run the daemon in the foreground",
        description="Run the per-user daemon in the foreground. Clients start one on demand,\n"
        "so this is for systemd, debugging, or custom settings. SIGTERM, SIGINT or\n"
        "`tractor-session stop` stop it; live leases stay on disk and the next daemon\n"
        "re-adopts them. It runs until then, unless given --exit-when-idle (a daemon\n"
        "started on demand is: 300 s, or $TRACTOR_SESSION_EXIT_WHEN_IDLE, logging to\n"
        "<root>-session/daemon.log).",
        epilog="examples:\n  tractor-session serve --port-pool 20000-29999\n  tractor-session serve -v",
    )
    p.add_argument("--root", metavar="DIR", help=f"runtime root (default: ${envelope.ROOT_ENV} or tractor's)")
    p.add_argument("--socket", metavar="PATH", help="control socket (default: <root>-session/control.sock)")
    p.add_argument("--port-pool", metavar="LOW-HIGH", help="registry ports to hand out (default: 20000-29999)")
    seconds, count = _positive(float), _positive(int)
    p.add_argument("--reap-grace", type=seconds, metavar="SECONDS",
                   help="time between SIGINT and SIGKILL when reaping (default: 3)")
    p.add_argument("--max-leases", type=count, metavar="N", help="most live leases (default: 20000)")
    p.add_argument("--gc-interval", type=seconds, metavar="SECONDS",
                   help="time between garbage sweeps (default: 60)")
    p.add_argument("--gc-grace", type=_positive(float, zero=True), metavar="SECONDS",
                   help="age below which a directory without a record is spared (default: 300)")
    p.add_argument("--request-timeout", type=seconds, metavar="SECONDS",
                   help="how long a client may take to send one whole request (default: 5)")
    p.add_argument("--idle-timeout", type=seconds, metavar="SECONDS",
                   help="how long a connection holding no lease may stay silent (default: 60)")
    p.add_argument("--max-message-bytes", type=count, metavar="N",
                   help="largest request accepted (default: 65536)")
    p.add_argument("--max-connections", type=count, metavar="N",
                   help="most concurrent client connections; at the limit, the one idle longest"
                   " and holding no lease is closed to make room (default: 1024)")
    p.add_argument("--exit-when-idle", type=seconds, metavar="SECONDS",
                   help="exit after SECONDS with no live lease and no client connected (default: never)")
    p.add_argument("-v", "--verbose", action="store_true", help="also log every grant and release")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="the least severe messages logged (default: info; debug implies -v)")
    p.add_argument("--log-file", metavar="PATH",
                   help="log to PATH, rotated past 1 MiB with one old copy (PATH.1), not to stderr")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)


def _add_stop(sub: _Subparsers, fmt: _Format) -> None:
    p = sub.add_parser(
        "stop", formatter_class=fmt, help="stop the daemon; live leases carry over to the next",
        description="Stop the daemon, as SIGTERM does: live leases stay on disk (their commands\n"
        "keep running) and the next daemon, which the next command starts, re-adopts\n"
        "them. Returns once the daemon has exited. With no daemon running, says so.\n"
        "Use it to pick up a new version after an upgrade (see `tractor-session --version`).",
        epilog="example:\n  tractor-session stop && tractor-session lease -- pytest   # under a fresh daemon",
    )
    p.set_defaults(func=cmd_stop)


def _add_systemd(sub: _Subparsers, fmt: _Format) -> None:
    p = sub.add_parser(
        "systemd", formatter_class=fmt, help="install the daemon as a systemd user service",
        description="install: write tractor-session.socket and .service into\n"
        "~/.config/systemd/user/ (ExecStart= runs this installation), run\n"
        "`systemctl --user daemon-reload`, and with --now enable and start the socket.\n"
        "uninstall: stop, disable and remove them.",
        epilog="examples:\n  tractor-session systemd install --now\n  tractor-session systemd uninstall",
    )
    p.add_argument("action", choices=("install", "uninstall"))
    p.add_argument("--now", action="store_true", help="also enable and start the socket unit")
    p.set_defaults(func=cmd_systemd)


def _add_completion(sub: _Subparsers, fmt: _Format) -> None:
    p = sub.add_parser(
        "completion", formatter_class=fmt, help="print a shell completion script",
        description="Print a completion script for bash or zsh, generated from this\n"
        "command's own parser: commands, options, their choices, and after -- the\n"
        "command to run. Load it from your shell's start-up file.",
        epilog="examples:\n"
        "  tractor-session completion bash > ~/.local/share/bash-completion/completions/tractor-session\n"
        "  echo 'source <(tractor-session completion zsh)' >> ~/.zshrc",
    )
    p.add_argument("shell", choices=("bash", "zsh"))
    p.set_defaults(func=_print_completion)


def _print_completion(args: argparse.Namespace) -> int:
    from tractor_session import completion

    parser = _parser([])  # every command's
    print(completion.bash(parser) if args.shell == "bash" else completion.zsh(parser), end="")
    return 0


_COMMANDS = {
    "lease": _add_lease,
    "status": _add_status,
    "release": _add_release,
    "renew": _add_renew,
    "ps": _add_ps,
    "exec": _add_exec,
    "gc": _add_gc,
    "serve": _add_serve,
    "stop": _add_stop,
    "systemd": _add_systemd,
    "completion": _add_completion,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status.  Usage errors exit 2 with the
    usage of the command at fault; no error a user can cause prints a
    traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser(argv)
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    if not argv[0].startswith("-") and argv[0] not in _COMMANDS:
        import difflib

        close = difflib.get_close_matches(argv[0], _COMMANDS, n=1)
        parser.error(f"unknown command {argv[0]!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.func
    try:
        code = command(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # `status | head -1`: the reader has gone, so has the rest of the
        # output; exit as a process killed by SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13
    except UsageError as err:
        at_fault: argparse.ArgumentParser = args.parser
        at_fault.error(str(err))
    except ClientError as err:
        return fail(str(err))
    except paths.UnsafePathError as err:
        return fail(str(err))
    except KeyboardInterrupt:
        return 130
