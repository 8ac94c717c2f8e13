"""Looking into a live session and joining it: ``ps ID`` and ``exec ID -- CMD``.

- ``ps`` shows the session's processes as a tree under the process holding
  the lease (``lease`` for a command's session, the holder for an exported
  one), with each one's kernel name and command line, a grandchild that
  renamed itself included; and the socket files of the bindspace, with
  whether anyone listens on each, also on one bound inside a private
  network (whose sockets only that network's table lists).
- ``exec`` runs a command with the session's envelope (and not the
  variables of another session the caller carries), passes its exit
  status through (126/127, 128+N as ``lease`` does), and exits 125 when
  the session cannot be found; the command is the session's: ``ps`` lists
  it and the session's end ends it (``exec`` then exits 124 and says why).
- with ``--net private``, the exec'd command is in the session's network:
  the same namespace as the lease's command, whose listener on
  127.0.0.1 it reaches.
- an unknown or malformed id is a clear error, no traceback, no daemon
  started for it.

Real daemon and CLI processes; every wait is a deadline-bounded ``wait_for``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import (
    CLI,
    DEADLINE,
    Runtime,
    export_lease,
    hold,
    only_child,
    pid_alive,
    start_lease_cmd,
    status_json,
    wait_for,
)

from tractor_session.run import SESSION_ENDED, SETUP_FAILED

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")

# Run as `python FAMILY OUT TITLE`: the leased command, which starts itself
# again as a grandchild of `lease` and waits for it.  The grandchild renames
# itself to TITLE (as a process-title library would, in the kernel's name),
# listens on the registry socket of the bindspace, leaves a socket nobody
# listens on, reports, and holds until its stdin (the test's pipe) closes.
FAMILY = r"""
import json, os, socket, subprocess, sys
out, title = sys.argv[1], sys.argv[2]
if sys.argv[3:] != ["grandchild"]:
    sys.exit(subprocess.call([sys.executable, __file__, out, title, "grandchild"]))
with open("/proc/self/comm", "w") as comm:
    comm.write(title)
sockets = os.path.join(os.environ["XDG_RUNTIME_DIR"], "tractor")
listening = socket.socket(socket.AF_UNIX)
listening.bind(os.path.join(sockets, "registry@1616.sock"))
listening.listen()
gone = socket.socket(socket.AF_UNIX)
gone.bind(os.path.join(sockets, f"gone@{os.getpid()}.sock"))
gone.close()
with open(out + ".tmp", "w") as f:
    json.dump({"pid": os.getpid()}, f)
os.replace(out + ".tmp", out)
sys.stdin.read()
"""

# What a command sees of sessions in its environment, as JSON; exits 7.
REPORT = (
    "import json, os, sys; print(json.dumps({k: v for k, v in os.environ.items()"
    " if k.startswith(('TRACTOR_SESSION', '_TRACTOR', 'XDG_'))})); sys.exit(7)"
)
ENVELOPE = (
    "_TRACTOR_RT_VARS", "XDG_RUNTIME_DIR", "TRACTOR_SESSION_ID", "TRACTOR_SESSION_SOCKET",
    "TRACTOR_SESSION_ROOT", "TRACTOR_SESSION_NET",
)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def ps(runtime: Runtime, lease_id: str) -> dict[str, Any]:
    done = runtime.cli("ps", lease_id, "--json")
    assert done.returncode == 0, done.stderr
    shown: dict[str, Any] = json.loads(done.stdout)
    return shown


def by_pid(shown: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {proc["pid"]: proc for proc in shown["processes"]}


def sockets(shown: dict[str, Any]) -> dict[str, bool]:
    """The bindspace's socket files, relative to it, and whether each is listened on."""
    bindspace = shown["lease"]["bindspace"]
    return {os.path.relpath(s["path"], bindspace): s["listening"] for s in shown["sockets"]}


# -- ps -------------------------------------------------------------------------------------


def test_ps_shows_the_tree_under_lease_and_the_bindspace_sockets(
    runtime: Runtime, daemon: subprocess.Popen[bytes], tmp_path: Path,
) -> None:
    script, out = tmp_path / "family.py", tmp_path / "grandchild.json"
    script.write_text(FAMILY)
    title = f"actor-{uuid.uuid4().hex[:6]}"
    cli, command, _, lease_id = start_lease_cmd(
        runtime, "--tpt-proto", "uds", cmd=[sys.executable, str(script), str(out), title],
    )
    grandchild = wait_for(lambda: read_json(out), what="the grandchild to listen")["pid"]  # type: ignore[index]

    shown = ps(runtime, lease_id[:8])
    procs = by_pid(shown)
    assert shown["lease"]["lease_id"] == lease_id
    assert shown["processes"][0]["pid"] == cli.pid, "the tree starts at the lease process"
    assert procs[cli.pid]["holder"] and procs[cli.pid]["depth"] == 0
    assert procs[command.pid]["ppid"] == cli.pid and procs[command.pid]["depth"] == 1
    assert str(script) in procs[command.pid]["cmdline"]
    assert procs[grandchild]["ppid"] == command.pid and procs[grandchild]["depth"] == 2
    assert procs[grandchild]["name"] == title
    assert procs[grandchild]["cmdline"].endswith("grandchild")
    assert not any(proc["holder"] for proc in shown["processes"][1:])
    assert sockets(shown) == {"tractor/registry@1616.sock": True, f"tractor/gone@{grandchild}.sock": False}

    text = runtime.cli("ps", lease_id[:8])
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"session {lease_id.replace('-', '')[:12]}: net host")
    (holder_line,) = (line for line in lines if line.split()[:1] == [str(cli.pid)])
    assert holder_line.endswith("(holds the lease)")
    (grandchild_line,) = (line for line in lines if line.split()[:1] == [str(grandchild)])
    assert title in grandchild_line and "└─ " in grandchild_line
    assert any(line.split() == ["listening", "tractor/registry@1616.sock"] for line in lines), lines
    assert any(line.split() == ["nobody", "listens", f"tractor/gone@{grandchild}.sock"] for line in lines), lines

    assert cli.stdin is not None
    cli.stdin.close()
    assert cli.wait(timeout=DEADLINE) == 0


# -- exec -----------------------------------------------------------------------------------


def test_exec_gives_the_envelope_and_passes_the_exit_status_through(runtime: Runtime, daemon: subprocess.Popen[bytes]) -> None:
    held = hold(runtime)
    lease_id = held.env["TRACTOR_SESSION_ID"]
    # A caller inside another session (a test of it, under its lease)
    # passes none of that session's own variables on.
    caller = {**runtime.env, "TRACTOR_SESSION_SCOPE": "tests/x.py::t", "TRACTOR_SESSION_SUBREAPER": "1"}
    done = runtime.cli("exec", lease_id[:8], "--", sys.executable, "-c", REPORT, env=caller)
    assert done.returncode == 7, done.stderr
    seen = json.loads(done.stdout)
    assert {name: seen.get(name) for name in ENVELOPE} == {name: held.env[name] for name in ENVELOPE}
    assert seen["XDG_RUNTIME_DIR"] == str(held.bindspace)
    assert "TRACTOR_SESSION_SCOPE" not in seen and "TRACTOR_SESSION_SUBREAPER" not in seen

    killed = runtime.cli("exec", lease_id, "--", "sh", "-c", "kill -TERM $$")
    assert killed.returncode == 128 + 15, killed.stderr
    missing = runtime.cli("exec", lease_id, "--", "no-such-program-here")
    assert missing.returncode == 127
    assert "cannot run 'no-such-program-here'" in missing.stderr
    assert held.finish() == 0


def test_an_execd_command_is_the_sessions_and_ends_with_it(runtime: Runtime, daemon: subprocess.Popen[bytes]) -> None:
    holder = runtime.holder()
    lease = export_lease(runtime, holder.pid)
    execd = runtime.popen([*CLI, "exec", lease["lease_id"], "--", "sleep", "1000"], stderr=subprocess.PIPE)
    sleeper = wait_for(lambda: only_child(execd.pid), what="the exec'd command")
    assert isinstance(sleeper, psutil.Process)

    shown = ps(runtime, lease["lease_id"])
    assert shown["processes"][0]["pid"] == holder.pid and shown["processes"][0]["holder"]
    assert sleeper.pid in by_pid(shown)
    assert execd.pid not in by_pid(shown), "exec itself stays outside the session"

    assert holder.stdin is not None
    holder.stdin.close()  # the holder ends, and with it the session
    wait_for(lambda: not pid_alive(sleeper.pid), what="the exec'd command to be reaped")
    assert execd.wait(timeout=DEADLINE) == SESSION_ENDED
    assert execd.stderr is not None
    said = execd.stderr.read().decode()
    assert "the session ended under 'sleep'" in said and "holder" in said, said
    wait_for(lambda: not Path(lease["bindspace"]).exists(), what="the bindspace to go")


# -- with a private network -------------------------------------------------------------------

# The leased command: listens on 127.0.0.1:1616 and on a unix socket in the
# bindspace, reports, then writes what its first TCP peer sends to OUT.got.
LISTENER = r"""
import json, os, socket, sys
out = sys.argv[1]
tcp = socket.socket()
tcp.bind(("127.0.0.1", 1616))
tcp.listen()
uds = socket.socket(socket.AF_UNIX)
uds.bind(os.path.join(os.environ["XDG_RUNTIME_DIR"], "tractor", f"listener@{os.getpid()}.sock"))
uds.listen()
with open(out + ".tmp", "w") as f:
    json.dump({"pid": os.getpid(), "netns": os.readlink("/proc/self/ns/net")}, f)
os.replace(out + ".tmp", out)
peer, _ = tcp.accept()
with open(out + ".got.tmp", "wb") as f:
    f.write(peer.recv(64))
os.replace(out + ".got.tmp", out + ".got")
sys.stdin.read()
"""

# An exec'd client: says which network it is in, and sends argv[1] to 127.0.0.1:1616.
CONNECT = (
    "import os, socket, sys; print(os.readlink('/proc/self/ns/net'));"
    " socket.create_connection(('127.0.0.1', 1616), timeout=10).sendall(sys.argv[1].encode())"
)


@pytest.fixture
def private_networks() -> None:
    """Skip unless this system lets us make a private network."""
    done = subprocess.run(
        [sys.executable, "-c", "from tractor_session import holder; holder.enter_private_network()"],
        capture_output=True, text=True, timeout=60,
    )
    if done.returncode != 0:
        pytest.skip(f"no private network here: {done.stderr.strip().splitlines()[-1:]}")


def test_exec_joins_the_private_network_of_the_session(
    runtime: Runtime, daemon: subprocess.Popen[bytes], private_networks: None, tmp_path: Path,
) -> None:
    out = tmp_path / "listener.json"
    lease = runtime.popen(
        [*CLI, "lease", "--net", "private", "--", sys.executable, "-c", LISTENER, str(out)], stdin=subprocess.PIPE,
    )
    listener = wait_for(lambda: read_json(out), what="the leased command to listen")
    assert isinstance(listener, dict)
    (info,) = status_json(runtime)
    # Bound to the command, so the daemon knows the session's network.
    wait_for(lambda: status_json(runtime)[0]["holder_pid"] == listener["pid"], what="the lease to be bound")

    shown = ps(runtime, info["lease_id"])
    assert shown["processes"][0]["pid"] == lease.pid and shown["processes"][0]["holder"]
    assert listener["pid"] in by_pid(shown)
    # Listed only in the private network's socket table, not the host's.
    assert sockets(shown) == {f"tractor/listener@{listener['pid']}.sock": True}

    token = uuid.uuid4().hex
    done = runtime.cli("exec", info["lease_id"], "--", sys.executable, "-c", CONNECT, token)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == listener["netns"] != os.readlink("/proc/self/ns/net")
    got = wait_for(lambda: (out.parent / (out.name + ".got")).exists(), what="the listener to hear from exec")
    assert got and (out.parent / (out.name + ".got")).read_text() == token

    assert lease.stdin is not None
    lease.stdin.close()
    assert lease.wait(timeout=DEADLINE) == 0


# -- errors -----------------------------------------------------------------------------------


def test_unknown_and_malformed_ids_are_clear_errors(runtime: Runtime, daemon: subprocess.Popen[bytes]) -> None:
    for argv, code in ((["ps", "0123abcd"], 1), (["exec", "0123abcd", "--", "true"], SETUP_FAILED)):
        done = runtime.cli(*argv)
        assert done.returncode == code, done
        assert "no live lease '0123abcd'" in done.stderr and "Traceback" not in done.stderr
    bad = runtime.cli("exec", "nope!", "--", "true")
    assert bad.returncode == SETUP_FAILED
    assert "is not a lease id" in bad.stderr and "Traceback" not in bad.stderr
    no_command = runtime.cli("exec", "0123abcd")
    assert no_command.returncode == 2 and "give the command to run" in no_command.stderr


def test_without_a_daemon_ps_and_exec_start_none(runtime: Runtime) -> None:
    for argv in (["ps", "0123abcd"], ["exec", "0123abcd", "--", "true"]):
        done = runtime.cli(*argv)
        assert done.returncode != 0
        assert "no tractor-session daemon runs" in done.stderr and "Traceback" not in done.stderr
    assert runtime.daemon_pid() is None


@pytest.mark.parametrize("sub", ["ps", "exec"])
def test_help_has_examples(runtime: Runtime, sub: str) -> None:
    done = runtime.cli(sub, "--help")
    assert done.returncode == 0, done.stderr
    assert f"examples:\n  tractor-session {sub} " in done.stdout
