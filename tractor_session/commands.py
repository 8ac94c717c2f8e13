"""The commands ``tractor-session`` runs, once :mod:`.cli` has parsed them.

Imports only the client side (no trio, no psutil) unless it is asked to
``serve``.  ``lease -- CMD`` runs on the hot path of every test run and
lives in :mod:`tractor_session.run`; it talks to the daemon in plain data
and nothing on its path imports msgspec.  The other commands use the
client's typed replies.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from tractor_session import envelope, paths
from tractor_session.client import ClientError, connect, grant

TYPE_CHECKING = False  # see client.py
if TYPE_CHECKING:
    from typing import Any

PROG = "tractor-session"
STOP_TIMEOUT = 15.0
"""How long ``stop`` waits for the daemon to let go of its lock."""


class UsageError(Exception):
    """A command line that parsed but makes no sense: exits 2 with the
    command's usage."""


def _json(obj: object) -> str:
    """``obj`` as indented JSON; protocol structs in it become plain data."""
    return json.dumps(obj, indent=2, default=_plain)


def _plain(struct: object) -> object:
    import msgspec

    return msgspec.to_builtins(struct)


def fail(message: str, code: int = 1) -> int:
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
            return fail(f"{err}; the shell's session variables are unset" if lines else str(err))
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


def cmd_ps(args: argparse.Namespace) -> int:
    from tractor_session import ps

    with connect(autostart=False) as conn:
        shown = ps.show(conn, args.lease_id)
        daemon_pid = conn.daemon_pid()
    found = ps.snapshot(shown, daemon_pid)
    print(_json(found) if args.json else ps.render(found))
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    command: list[str] = args.command
    if command and command[0] == "--":
        command = command[1:]
    if not command or not command[0]:
        raise UsageError(f"give the command to run after the id and --, e.g. `{PROG} exec {args.lease_id} -- sh`")
    from tractor_session.run import exec_in

    return exec_in(args.lease_id, command)


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
            return fail(str(busy))
        where = "directly (no daemon runs)"
    if args.json:
        print(_json(items))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for item in items:
        print(f"{verb} {item.kind} {item.path}: {item.reason}")
    print(f"{len(items)} item(s) {verb}, {where}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop the daemon and return once it has let go of its lock, so that
    the next command starts a fresh one (`stop && lease ...`)."""
    from tractor_session import autostart

    try:
        conn = connect(autostart=False)
    except ClientError as err:
        if err.code != "no-daemon":
            raise
        print(f"no daemon runs ({err}); nothing to stop")
        return 0
    root = paths.runtime_root()
    with conn:
        try:
            stopping = conn.stop()
            pid, kept, root = stopping.daemon_pid, f"{stopping.leases}", stopping.root
        except ClientError as err:
            if err.code not in ("protocol", "version"):
                raise
            # A daemon of another version that does not know the request
            # (or this client): SIGTERM stops it the same way.
            pid, kept = autostart.terminate_daemon(root), "its"
    if not autostart.wait_for_daemon_exit(root, STOP_TIMEOUT):
        return fail(
            f"the daemon (pid {pid}) was asked to stop but still runs after {STOP_TIMEOUT:g} s;"
            f" see its log ({os.path.join(paths.control_dir(root), paths.DAEMON_LOG_NAME)}"
            f" unless it runs under systemd), or `kill {pid}`"
        )
    autostart.wait_for_process_end(pid, 2.0)
    print(f"stopped the daemon (pid {pid})" + (
        "" if kept == "0" else f"; {kept} live leases stay on disk, and the next daemon re-adopts them"
    ))
    return 0


def show_version() -> int:
    """``--version``: this client's version and, when a daemon runs, the
    daemon's.  They differ when a daemon started before an upgrade still
    runs; that is said, with what to do."""
    import tractor_session

    ours = tractor_session.__version__
    print(f"{PROG} {ours}")
    try:
        with connect(autostart=False) as conn:
            theirs, pid = conn.daemon_version(), conn.daemon_pid()
    except ClientError as err:
        if err.code == "no-daemon":
            print("daemon: none runs (the next command starts one)")
            return 0
        if err.code != "version":
            return fail(f"cannot ask the daemon its version: {err}")
        print(f"daemon: of another version ({err})")
    except paths.UnsafePathError as err:
        return fail(str(err))
    else:
        print(f"daemon {theirs} (pid {pid})" if theirs else f"daemon (pid {pid}): too old to say its version")
        if theirs == ours:
            return 0
    print(
        f"{PROG}: the daemon's version differs from this client's; run `{PROG} stop`,"
        " and the next command starts a daemon of this version (live leases carry over)",
        file=sys.stderr,
    )
    return 0


def cmd_systemd(args: argparse.Namespace) -> int:
    from tractor_session import systemd_units as systemd

    try:
        said = systemd.install(args.now) if args.action == "install" else systemd.uninstall()
    except systemd.SystemctlError as err:
        print("\n".join(err.said))
        return fail(str(err))
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
        return fail(str(err))
    # Only what was given: the defaults live in daemon.Config.
    tuning = {name: getattr(args, name) for name in _SERVE_TUNING if getattr(args, name) is not None}
    if args.log_file is not None:
        tuning["log_file"] = Path(args.log_file)
    config = daemon.Config(root=root, socket=sock, port_pool=pool, **tuning)
    return daemon.serve(config, ready_fd=args.ready_fd)


_SERVE_TUNING = (
    "reap_grace", "max_leases", "gc_interval", "gc_grace", "request_timeout",
    "idle_timeout", "max_message_bytes", "max_connections", "exit_when_idle", "log_level", "verbose",
)
