"""The ``tractor-session`` command: argument parsing and the short commands.

Imports only the client side (no trio, no psutil) unless it is asked to
``serve``.  ``lease -- CMD`` runs on the hot path of every test run and
lives in :mod:`tractor_session.run`; it talks to the daemon in plain data
and nothing on its path imports msgspec.  The other commands use the
client's typed replies.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

from tractor_session import envelope, paths
from tractor_session.client import ClientError, connect, grant

TYPE_CHECKING = False  # see client.py
if TYPE_CHECKING:
    from typing import Any


    _Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]
    from argparse import _FormatterClass as _Format

PROG = "tractor-session"


class UsageError(Exception):
    pass


def _json(obj: object) -> str:
    """``obj`` as indented JSON; protocol structs in it become plain data."""
    return json.dumps(obj, indent=2, default=_plain)


def _plain(struct: object) -> object:
    import msgspec

    return msgspec.to_builtins(struct)


def _fail(message: str, code: int = 1) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


# -- lease ------------------------------------------------------------------


def cmd_lease(args: argparse.Namespace) -> int:
    command: list[str] = args.command
    if command and command[0] == "--":
        command = command[1:]
    if command and not command[0]:
        raise UsageError("the command to run is an empty string; give a program name after --")
    if args.export or args.json:
        if command:
            raise UsageError("--export/--json print a lease and return; they take no command")
        if args.net == "private":
            raise UsageError(
                "--net private needs a command to run in the new network"
                " (`lease --net private -- CMD`): an exported lease cannot move your shell"
            )
        return _lease_export(args)
    if not command:
        raise UsageError("give the command to run after --, e.g. `tractor-session lease -- pytest`")
    if args.holder_pid is not None or args.ttl is not None:
        raise UsageError("--holder-pid and --ttl go with --export (a command's lease lasts as long as it runs)")
    from tractor_session.run import run

    return run(_lease_request(args), command)


def _lease_request(args: argparse.Namespace, holder_pid: int | None = None) -> dict[str, Any]:
    return {
        "transport": args.tpt_proto, "holder_pid": holder_pid, "ttl": args.ttl,
        "reap": not args.no_reap, "set_xdg": not args.no_xdg, "parent": args.parent,
        "net": args.net, "inside": os.environ.get(envelope.SESSION_ID_ENV),
    }


def _lease_export(args: argparse.Namespace) -> int:
    from tractor_session import shell

    holder = args.holder_pid if args.holder_pid is not None else shell.calling_shell()
    with connect() as conn:
        lease, env = grant(conn, _lease_request(args, holder))
    print(_json({**lease, "env": env}) if args.json else shell.export_lines(env, os.environ))
    return 0


# -- other commands -----------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    from tractor_session import status

    try:
        conn = connect(autostart=False)
    except ClientError as err:
        if err.code != "no-daemon" or args.lease_id is not None:
            raise
        print("[]" if args.json else f"no daemon runs ({err}); the first lease starts one")
        return 0
    with conn:
        if args.lease_id is None:
            shown = conn.status()
            print(_json(shown.leases) if args.json else status.table(shown))
            return 0
        info = conn.status(args.lease_id).leases[0]
        children = [i.lease_id for i in conn.status().leases if i.parent == info.lease_id]
    print(_json(info) if args.json else status.details(info, children))
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    lease_id = args.lease_id or os.environ.get(envelope.SESSION_ID_ENV)
    if not lease_id:
        raise UsageError(f"give the lease's id (`tractor-session status` lists them); ${envelope.SESSION_ID_ENV} is unset")
    try:
        with connect(autostart=False) as conn:
            released = conn.release(lease_id)
    except ClientError as err:
        if args.export and err.code in ("no-daemon", "unknown-lease", "ended"):
            # Still put the shell back: its session is gone either way.
            lines = _unset_lines()
            print(lines)
            return _fail(f"{err}; the shell's session variables are unset" if lines else str(err))
        raise
    said = f"released {released.lease_id}" + (f"; reaped {len(released.reaped)} process(es)" if released.reaped else "")
    if args.export:
        # The shell evaluates stdout; people read stderr.
        print(said, file=sys.stderr)
        print(_unset_lines())
    else:
        print(said)
    return 0


def _unset_lines() -> str:
    from tractor_session import shell

    return shell.unset_lines(os.environ)


def cmd_renew(args: argparse.Namespace) -> int:
    with connect(autostart=False) as conn:
        renewed = conn.renew(args.lease_id, args.ttl)
    assert renewed.expires is not None
    print(f"renewed {renewed.lease_id} until {time.strftime('%H:%M:%S', time.localtime(renewed.expires))}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    try:
        with connect(autostart=False) as conn:
            items = conn.gc(args.dry_run, args.grace).items
            where = f"through the daemon (pid {conn.daemon_pid()})"
    except ClientError as err:
        if err.code != "no-daemon":
            raise
        from pathlib import Path

        from tractor_session import gc

        try:
            items = gc.collect_without_daemon(Path(paths.runtime_root()), args.dry_run, args.grace)
        except gc.BusyError as busy:
            return _fail(str(busy))
        where = "directly (no daemon runs)"
    if args.json:
        print(_json(items))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for item in items:
        print(f"{verb} {item.kind} {item.path}: {item.reason}")
    print(f"{len(items)} item(s) {verb}, {where}")
    return 0


def cmd_systemd(args: argparse.Namespace) -> int:
    from tractor_session import systemd_units as systemd

    said = systemd.install(args.now) if args.action == "install" else systemd.uninstall()
    print("\n".join(said))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tractor_session import daemon
    from tractor_session.daemon import ports

    root = Path(args.root or paths.runtime_root())
    sock = Path(args.socket or os.path.join(paths.control_dir(root), "control.sock"))
    if not root.is_absolute():
        raise UsageError(f"the runtime root must be an absolute path, not {root}")
    try:
        pool = ports.parse_pool(args.port_pool) if args.port_pool else ports.DEFAULT_POOL
        ports.PortPool(pool)
    except ports.PortPoolError as err:
        return _fail(str(err))
    # Only what was given: the defaults live in daemon.Config.
    tuning = {name: getattr(args, name) for name in _SERVE_TUNING if getattr(args, name) is not None}
    config = daemon.Config(root=root, socket=sock, port_pool=pool, **tuning)
    return daemon.serve(config, ready_fd=args.ready_fd)


_SERVE_TUNING = (
    "reap_grace", "max_leases", "gc_interval", "gc_grace", "request_timeout",
    "idle_timeout", "max_message_bytes", "max_connections",
)


def _positive(convert: type[int] | type[float], zero: bool = False) -> Callable[[str], int | float]:
    """An argparse type: a finite number above zero (or zero too)."""
    def parse(text: str) -> int | float:
        value = convert(text)
        if not (value >= 0 if zero else value > 0) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a {'non-negative' if zero else 'positive'} number, not {text}")
        return value
    parse.__name__ = convert.__name__
    return parse


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
        "so this is for systemd, debugging, or custom settings. SIGTERM or SIGINT\n"
        "stop it; live leases stay on disk and the next daemon re-adopts them.",
        epilog="example:\n  tractor-session serve --port-pool 20000-29999",
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
                   help="most concurrent client connections (default: 1024)")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)


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


_COMMANDS = {
    "lease": _add_lease,
    "status": _add_status,
    "release": _add_release,
    "renew": _add_renew,
    "gc": _add_gc,
    "serve": _add_serve,
    "systemd": _add_systemd,
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
        return _fail(str(err))
    except paths.UnsafePathError as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        return 130
