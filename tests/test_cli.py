"""The command line: ``lease -- CMD`` passes CMD's exit status through (126
and 127 when it cannot run, 128+N when a signal ends it) and passes
signals on, even without a stdin; ``release`` and ``status`` say clearly
what they did or why not; every subcommand's help has an example; and
``lease`` stays light to start (it runs before every test run).

Real ``python -m tractor_session`` processes against a real daemon, real
signals; nothing of ours is mocked.  Every wait is a deadline-bounded
``wait_for``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import (
    CLI,
    DEADLINE,
    SLEEP,
    UDS_REGISTRY_NAME,
    PortPool,
    Runtime,
    daemon_status,
    export_lease,
    hold,
    pid_alive,
    read_record,
    status_json,
    stop_autostarted_daemon,
    wait_for,
)

from tractor_session.run import SESSION_ENDED

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")


# -- exit status and signals ------------------------------------------------------------

# Installs handlers for INT, TERM and HUP that record the signal and exit
# 40+N; argv: OUT READY.
ON_SIGNAL = r"""
import os, signal, sys
out, ready = sys.argv[1], sys.argv[2]
def handler(signum, frame):
    with open(out, "a") as f:
        f.write(f"{signum}\n")
    os._exit(40 + signum)
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, handler)
open(ready, "w").close()
while True:
    signal.pause()
"""


def signal_caught(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``sig``."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def test_exit_status_passes_through(runtime: Runtime, daemon) -> None:
    for script, expected in [
        ("exit 0", 0),
        ("exit 7", 7),
        ("exit 255", 255),
        ("kill -TERM $$", 128 + signal.SIGTERM),
        ("kill -KILL $$", 128 + signal.SIGKILL),
    ]:
        res = runtime.cli("lease", "--", "sh", "-c", script)
        assert res.returncode == expected, (script, res.stderr)
        assert runtime.bindspaces() == [], script


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_signals_to_the_cli_are_passed_on_to_the_command(runtime: Runtime, daemon, sig: signal.Signals) -> None:
    out, ready = runtime.base / "signal", runtime.base / "ready"
    cli = runtime.popen(
        [*CLI, "lease", "--", sys.executable, "-c", ON_SIGNAL, str(out), str(ready)],
        stdin=subprocess.DEVNULL,
    )
    wait_for(lambda: ready.exists() or cli.poll() is not None, what="the command's handlers")
    assert cli.poll() is None
    # The CLI installs its forwarding handlers right after starting CMD;
    # SIGHUP's is the last one.
    wait_for(lambda: signal_caught(cli.pid, signal.SIGHUP), what="the CLI's signal handlers")
    assert len(runtime.bindspaces()) == 1

    cli.send_signal(sig)
    assert cli.wait(timeout=DEADLINE) == 40 + sig  # CMD's own exit status
    assert out.read_text() == f"{int(sig)}\n"  # delivered exactly once
    assert runtime.bindspaces() == []


def test_sigint_is_passed_on_when_the_cli_has_no_stdin(runtime: Runtime, daemon) -> None:
    out, ready = runtime.base / "signal", runtime.base / "ready"
    # `exec 0<&-`: the CLI starts with fd 0 closed (as under some
    # supervisors), so Python sets sys.stdin to None.
    cli = runtime.popen(
        ["sh", "-c", 'exec 0<&-; exec "$@"', "sh",
         *CLI, "lease", "--", sys.executable, "-c", ON_SIGNAL, str(out), str(ready)],
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: ready.exists() or cli.poll() is not None, what="the command's handlers")
    assert cli.poll() is None
    wait_for(lambda: signal_caught(cli.pid, signal.SIGHUP), what="the CLI's signal handlers")
    cli.send_signal(signal.SIGINT)
    code = cli.wait(timeout=DEADLINE)
    assert cli.stderr is not None
    stderr = cli.stderr.read().decode()
    assert "Traceback" not in stderr, stderr
    assert code == 40 + signal.SIGINT, stderr


def test_command_not_found_exits_127_and_leaves_no_lease(runtime: Runtime, daemon) -> None:
    missing = f"no-such-command-{uuid.uuid4().hex[:8]}"
    res = runtime.cli("lease", "--", missing, "--some-arg")
    assert res.returncode == 127
    assert missing in res.stderr
    assert "Traceback" not in res.stderr
    assert status_json(runtime) == []
    assert runtime.bindspaces() == []


def test_command_not_executable_exits_126_and_leaves_no_lease(runtime: Runtime, daemon) -> None:
    script = runtime.base / "not-executable.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o600)
    res = runtime.cli("lease", "--", str(script))
    assert res.returncode == 126
    assert str(script) in res.stderr
    assert status_json(runtime) == []
    assert runtime.bindspaces() == []


# -- release and status ---------------------------------------------------------------


def test_release_of_an_unknown_id_fails_clearly(runtime: Runtime, daemon) -> None:
    unknown = str(uuid.uuid4())
    res = runtime.cli("release", unknown)
    assert res.returncode != 0
    assert unknown in res.stderr and "no live lease" in res.stderr
    assert "Traceback" not in res.stderr


def test_release_of_a_malformed_id_fails_clearly(runtime: Runtime, daemon) -> None:
    holder = runtime.holder()
    lease = export_lease(runtime, holder.pid)
    for bad in ["../../etc", "0123456789ag", "x" * 500, "-1"]:
        res = runtime.cli("release", bad)
        assert res.returncode != 0, bad
        assert "not a lease id" in res.stderr, (bad, res.stderr)
        assert "Traceback" not in res.stderr
    # No id and no session to default to: a usage error.
    res = runtime.cli("release", "")
    assert res.returncode == 2 and "TRACTOR_SESSION_ID" in res.stderr, res.stderr
    # Nothing was touched.
    assert Path(lease["bindspace"]).is_dir()
    assert [i["lease_id"] for i in status_json(runtime)] == [lease["lease_id"]]


def test_status_lists_live_leases(runtime: Runtime, daemon) -> None:
    tcp_holder, uds_holder = runtime.holder(), runtime.holder()
    before = time.time()
    tcp = export_lease(runtime, tcp_holder.pid)
    uds = export_lease(runtime, uds_holder.pid, "--tpt-proto", "uds")
    after = time.time()

    assert (daemon_status(runtime).daemon_pid, daemon_status(runtime).root) == (daemon.pid, str(runtime.root))
    shown = runtime.cli("status").stdout.splitlines()[0]
    assert shown == f"daemon pid {daemon.pid}, root {runtime.root}: 2 live lease(s)", shown
    by_id = {info["lease_id"]: info for info in status_json(runtime)}
    assert set(by_id) == {tcp["lease_id"], uds["lease_id"]}

    info = by_id[tcp["lease_id"]]
    assert info["holder_pid"] == tcp_holder.pid
    assert info["bindspace"] == tcp["bindspace"]
    assert info["transport"] == "tcp"
    assert info["registry_addr"] == ["127.0.0.1", tcp["port"]]
    assert before - 1 <= info["created"] <= after + 1

    info = by_id[uds["lease_id"]]
    assert info["holder_pid"] == uds_holder.pid
    assert info["bindspace"] == uds["bindspace"]
    assert info["transport"] == "uds"
    assert info["registry_addr"] == [str(Path(uds["bindspace"]) / "tractor"), UDS_REGISTRY_NAME]
    assert before - 1 <= info["created"] <= after + 1

    res = runtime.cli("status")
    assert res.returncode == 0, res.stderr
    assert all(len(line) <= 100 for line in res.stdout.splitlines()), res.stdout
    short = {lease["lease_id"]: lease["lease_id"].replace("-", "")[:12] for lease in (tcp, uds)}
    lines = {lid: line for lid in short for line in res.stdout.splitlines() if line.startswith(short[lid])}
    assert set(lines) == {tcp["lease_id"], uds["lease_id"]}, res.stdout
    for lease, holder, addr in (
        (tcp, tcp_holder, f"127.0.0.1:{tcp['port']}"),
        (uds, uds_holder, f"uds {UDS_REGISTRY_NAME}"),
    ):
        line = lines[lease["lease_id"]]
        assert f" {holder.pid} {sys.executable[:8]}" in line  # the holder's command, cut to fit
        assert addr in line
        assert re.search(r"\s\d+[smh]\s", line), f"no age in {line!r}"
        # With an id (any unique prefix), everything about the lease.
        details = runtime.cli("status", short[lease["lease_id"]][:8])
        assert details.returncode == 0, details.stderr
        fields = dict(line.split(None, 1) for line in details.stdout.splitlines())
        assert fields["lease"] == lease["lease_id"] and fields["bindspace"] == lease["bindspace"]
        assert fields["holder"].startswith(f"{holder.pid} {sys.executable}")
        assert fields["registry"] == (
            addr if lease is tcp else f"{uds['bindspace']}/tractor/{UDS_REGISTRY_NAME}"
        )


# -- help, and what `lease` costs to start ----------------------------------------------


@pytest.mark.parametrize("sub", ["lease", "status", "release", "renew", "serve"])
def test_help_of_every_subcommand_has_an_example(runtime: Runtime, sub: str) -> None:
    res = runtime.cli(sub, "--help")
    assert res.returncode == 0, res.stderr
    assert "example" in res.stdout
    assert re.search(rf"^\s+tractor-session {sub}\b", res.stdout, re.MULTILINE), res.stdout


def imported_modules(argv: list[str], env: dict[str, str]) -> set[str]:
    """The top-level packages ``python -X importtime ARGV`` imports."""
    res = subprocess.run([sys.executable, "-X", "importtime", *argv], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return {line.rpartition("|")[2].strip().partition(".")[0] for line in res.stderr.splitlines()}


@pytest.mark.parametrize("with_daemon", [True, False], ids=["daemon-running", "cold-start"])
def test_lease_command_imports_nothing_heavy(runtime: Runtime, pool: PortPool, with_daemon: bool) -> None:
    """`lease -- CMD` runs before every test run: no trio or psutil ever,
    and with a daemon running no msgspec, typing or pathlib either (each
    costs milliseconds; the lease itself costs about one).  What the
    interpreter imports at start-up (a site hook, say) is not ours."""
    if with_daemon:
        runtime.start_daemon("--port-pool", str(pool))
    try:
        ours = imported_modules(["-m", "tractor_session", "lease", "--", "true"], runtime.env)
    finally:
        stop_autostarted_daemon(runtime)
    assert "tractor_session" in ours  # importtime did report
    heavy = {"trio", "psutil"} | ({"msgspec", "typing", "pathlib"} if with_daemon else set())
    assert (ours - imported_modules(["-c", "pass"], runtime.env)) & heavy == set()


# -- usage errors: exit 2, the usage of the command at fault, never a traceback -----------


@pytest.mark.parametrize(("argv", "says"), [
    ([], "COMMAND"),
    (["releas"], "did you mean 'release'?"),
    (["lease", "--export", "--json"], "usage: tractor-session lease"),
    (["lease", "--", ""], "empty string"),
    (["lease"], "usage: tractor-session lease"),
    (["renew", "3f2a", "--ttl", "-1"], "usage: tractor-session renew"),
], ids=["no-args", "typo", "export-and-json", "empty-command", "no-command", "bad-ttl"])
def test_usage_errors_exit_2_with_the_right_usage(runtime: Runtime, argv: list[str], says: str) -> None:
    res = runtime.cli(*argv)
    assert res.returncode == 2, res
    assert says in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert runtime.daemon_pid() is None and runtime.bindspaces() == []


def test_a_closed_pipe_ends_output_quietly(runtime: Runtime, daemon) -> None:
    """`status | head -1` with the reader gone before we write: exit as
    SIGPIPE would, no traceback."""
    export_lease(runtime, runtime.holder().pid)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        res = subprocess.run([*CLI, "status"], env=runtime.env, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert res.returncode == 128 + signal.SIGPIPE
    assert res.stderr == "", res.stderr


# -- ids: any unique prefix --------------------------------------------------------------


def test_any_unique_prefix_names_a_lease_and_an_ambiguous_one_lists_the_candidates(runtime: Runtime, daemon) -> None:
    holder = runtime.holder()
    # Seventeen ids: two of them share their first hex digit.
    leases = [export_lease(runtime, holder.pid, "--ttl", "600") for _ in range(17)]
    by_digit: dict[str, list[str]] = {}
    for lease in leases:
        by_digit.setdefault(lease["lease_id"][0], []).append(lease["lease_id"])
    digit, shared = next((d, ids) for d, ids in by_digit.items() if len(ids) > 1)

    res = runtime.cli("release", digit)
    assert res.returncode == 1, res
    assert f"names {len(shared)} live leases" in res.stderr
    assert all(lease_id.replace("-", "")[:12] in res.stderr for lease_id in shared), res.stderr
    assert len(status_json(runtime)) == 17  # nothing was released

    target = shared[0]
    unique = next(
        target.replace("-", "")[:n] for n in range(2, 13)
        if sum(lid.replace("-", "").startswith(target.replace("-", "")[:n]) for lid in shared) == 1
    )
    assert runtime.cli("renew", unique, "--ttl", "900").returncode == 0
    assert json.loads(runtime.cli("status", unique, "--json").stdout)["lease_id"] == target
    # A prefix written with the uuid's dashes works too.
    res = runtime.cli("release", target[:10])
    assert res.returncode == 0, res.stderr
    assert target not in {info["lease_id"] for info in status_json(runtime)}


# -- a command's lease ---------------------------------------------------------------------


def test_a_command_s_lease_refuses_a_ttl(runtime: Runtime, daemon) -> None:
    held = hold(runtime)
    res = runtime.cli("renew", held.rtvars._session_uuid or "", "--ttl", "3")
    assert res.returncode == 1 and "takes no ttl" in res.stderr, res.stderr
    record = read_record(held.bindspace)
    assert record is not None and record["expires"] is None and record["ttl"] is None
    assert held.finish() == 0


def test_lease_says_why_when_its_session_ends_under_the_command(runtime: Runtime, daemon) -> None:
    cli = runtime.popen(
        [*CLI, "lease", "--", sys.executable, "-c", SLEEP], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    (bindspace,) = wait_for(runtime.bindspaces, what="the lease")  # type: ignore[misc]
    record = wait_for(lambda: (r := read_record(bindspace)) and r["holder_pid"] != cli.pid and r)
    assert isinstance(record, dict)
    assert runtime.cli("release", record["lease_id"]).returncode == 0
    assert cli.wait(timeout=DEADLINE) == SESSION_ENDED
    assert cli.stderr is not None
    said = cli.stderr.read().decode()
    assert "ended under" in said and "released by pid" in said and "tractor_session release" in said, said
    assert not pid_alive(record["holder_pid"])


def test_a_lease_taken_inside_a_session_is_its_child(runtime: Runtime, daemon) -> None:
    outer = hold(runtime)
    outer_id = outer.rtvars._session_uuid
    inner = runtime.popen(
        [*CLI, "lease", "--", sys.executable, "-c", SLEEP], env=outer.env,
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    inner_info = wait_for(lambda: next((i for i in status_json(runtime) if i["parent"] == outer_id), None))
    assert isinstance(inner_info, dict)
    table = runtime.cli("status").stdout.splitlines()
    short = inner_info["lease_id"].replace("-", "")[:12]
    (row,) = [n for n, line in enumerate(table) if short in line]
    assert table[row].startswith(f"└ {short}") and (outer_id or "").replace("-", "")[:12] in table[row - 1]
    details = runtime.cli("status", (outer_id or "")[:8]).stdout
    assert f"children   {short}" in details, details

    # The outer session ends: the inner one with it, and its `lease` says so.
    assert runtime.cli("release", outer_id or "").returncode == 0
    assert inner.wait(timeout=DEADLINE) == SESSION_ENDED
    assert inner.stderr is not None and "its parent" in inner.stderr.read().decode()
    assert status_json(runtime) == [] and runtime.bindspaces() == []


# -- a session in the user's shell -----------------------------------------------------------

# `$(... | cat)`: the substitution runs a pipeline, so `lease --export` runs
# under a moment-long fork of the shell.  argv: OUT; the shell blocks on its
# stdin between the export and the release.
SHELL_SESSION = r"""
ts="$PY -m tractor_session"
eval "$($ts lease --export | cat)"
echo "$$ $TRACTOR_SESSION_ID $XDG_RUNTIME_DIR" > "$1.tmp" && mv "$1.tmp" "$1"
read -r _
eval "$($ts release --export)"
printf '%s\n' "${XDG_RUNTIME_DIR-unset}" "${TRACTOR_SESSION_ID-unset}" "${TRACTOR_SESSION_ROOT-unset}" \
    "${TRACTOR_SESSION_SAVED_ENV-unset}" > "$1.after"
"""


def test_an_exported_session_lives_as_long_as_the_shell_and_release_restores_it(runtime: Runtime, daemon) -> None:
    out = runtime.base / "shell"
    xdg = runtime.base / "my xdg"
    xdg.mkdir(mode=0o700)
    env = {**runtime.env, "PY": sys.executable, "XDG_RUNTIME_DIR": str(xdg)}
    shell = runtime.popen(["bash", "-c", SHELL_SESSION, "bash", str(out)], env=env, stdin=subprocess.PIPE)
    wait_for(out.exists, what="the shell to export a session")
    shell_pid, lease_id, inside_xdg = out.read_text().split()
    assert int(shell_pid) == shell.pid
    # Bound to the shell, not to the fork that ran the pipeline (gone by now).
    (info,) = status_json(runtime)
    assert (info["lease_id"], info["holder_pid"]) == (lease_id, shell.pid)
    assert inside_xdg == info["bindspace"]

    assert shell.stdin is not None
    shell.stdin.write(b"\n")
    shell.stdin.close()
    assert shell.wait(timeout=DEADLINE) == 0
    # XDG_RUNTIME_DIR and TRACTOR_SESSION_ROOT as they were, the rest gone.
    restored = (out.parent / "shell.after").read_text().splitlines()
    assert restored == [str(xdg), "unset", str(runtime.root), "unset"]
    assert status_json(runtime) == [] and runtime.bindspaces() == []


# -- shell completion, generated from the parser ---------------------------------------------

# Sources a completion script, completes the words given, prints the candidates.
COMPLETE = r"""
source "$1"; shift
COMP_WORDS=("$@"); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
_tractor_session
printf '%s\n' "${COMPREPLY[@]}"
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(("words", "expected"), [
    (["le"], {"lease"}),
    (["lease", "--tp"], {"--tpt-proto"}),
    (["lease", "--tpt-proto", ""], {"tcp", "uds"}),
    (["systemd", ""], {"install", "uninstall"}),
    (["serve", "--ready"], set()),  # hidden options stay hidden
    (["exec", "3f2a", "--", "bas"], {"bash"}),  # after --, a command to run
])
def test_bash_completion_completes_commands_options_and_choices(
    runtime: Runtime, tmp_path: Path, words: list[str], expected: set[str],
) -> None:
    script = runtime.cli("completion", "bash")
    assert script.returncode == 0, script.stderr
    (tmp_path / "complete.bash").write_text(script.stdout)
    assert subprocess.run(["bash", "-n", tmp_path / "complete.bash"]).returncode == 0
    done = subprocess.run(
        ["bash", "-c", COMPLETE, "bash", tmp_path / "complete.bash", "tractor-session", *words],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert set(done.stdout.split()) >= expected and (expected or not done.stdout.split()), done.stdout


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed here")
def test_zsh_completion_script_parses(runtime: Runtime, tmp_path: Path) -> None:
    script = runtime.cli("completion", "zsh")
    assert script.returncode == 0 and "bashcompinit" in script.stdout
    (tmp_path / "complete.zsh").write_text(script.stdout)
    assert subprocess.run(["zsh", "-n", tmp_path / "complete.zsh"]).returncode == 0
