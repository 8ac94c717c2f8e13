"""Integration tests for the pytest plugin (``tractor_session.pytest_plugin``,
entry point ``tractor_session``).

Every inner pytest run is a real, separate process (``pytester``'s
subprocess mode, or ``subprocess.Popen`` for runs started at the same time)
talking to a real daemon in the ``runtime`` fixture's private root: one
the plugin autostarts, or (where autostart is not the point) one from the
``daemon`` fixture, which is this process's child and so is reaped at once.  Inner tests record what they see (lease id,
bindspace, registry address, ``tractor-session status --json``) as JSON
files in ``<pytester dir>/out``, which the outer test reads afterwards.
Nothing here sleeps to synchronise: inner tests wait on conditions with
deadlines, outer tests wait on processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import Runtime, daemon_status, kill_tree, pid_alive, status_json, wait_for

pytest_plugins = ["pytester"]

RUN_TIMEOUT = 60.0
CLEAN_LINE = "tractor-session: the run left nothing behind in its session"
LEAK_HEADER = "tractor-session: left behind in the session"
HEADER = "tractor-session: session "

# Helpers importable by the inner tests (the pytester dir is their rootdir,
# prepended to sys.path by pytest's default import mode).
TSHELP = '''
import json
import os
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "out"
DEADLINE = 30.0


def record(name, data):
    """Write ``data`` as out/<name>.json, atomically."""
    OUT.mkdir(exist_ok=True)
    tmp = OUT / f"{name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data))
    tmp.rename(OUT / f"{name}.json")


def read(name):
    try:
        return json.loads((OUT / f"{name}.json").read_text())
    except FileNotFoundError:
        return None


def wait_for(condition, timeout=DEADLINE, what="condition"):
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def status():
    """``tractor-session status --json``, run from inside the session."""
    proc = subprocess.run(
        [sys.executable, "-m", "tractor_session", "status", "--json"],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def lease_info(lease):
    return {
        "lease_id": lease.lease_id,
        "bindspace": str(lease.bindspace),
        "transport": lease.transport,
        "registry_addr": list(lease.registry_addr),
        "inherited": lease.inherited,
        "worker": os.environ.get("PYTEST_XDIST_WORKER"),
        "pid": os.getpid(),
        "env_session_id": os.environ.get("TRACTOR_SESSION_ID"),
    }
'''


# -- helpers ------------------------------------------------------------------


@pytest.fixture
def inner(pytester: pytest.Pytester, runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester dir with the inner helpers, and an environment (inherited
    by every inner run) that points at ``runtime``'s root and nowhere else:
    no session, no xdist worker identity, no addopts from the outer run."""
    for name in (
        "TRACTOR_SESSION_ID", "XDG_RUNTIME_DIR", "PYTEST_ADDOPTS",
        "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID",
    ):
        monkeypatch.delenv(name, raising=False)
    assert os.environ["TRACTOR_SESSION_ROOT"] == str(runtime.root)
    pytester.makepyfile(tshelp=TSHELP)
    return pytester


def out(pytester: pytest.Pytester, name: str) -> Any:
    return json.loads((pytester.path / "out" / f"{name}.json").read_text())


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=RUN_TIMEOUT)


def start(
    pytester: pytest.Pytester, runtime: Runtime, *args: str, env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start an inner pytest run without waiting for it (killed at teardown)."""
    return runtime.popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        env={**os.environ, **(env or {})}, cwd=pytester.path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def finish(proc: subprocess.Popen[bytes]) -> pytest.RunResult:
    began = time.monotonic()
    stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    return pytest.RunResult(
        proc.returncode, stdout.decode().splitlines(), stderr.decode().splitlines(),
        time.monotonic() - began,
    )


def assert_all_released(runtime: Runtime, daemon: subprocess.Popen[bytes] | None = None) -> None:
    """No lease left in the daemon and no bindspace left on disk (and, given
    the daemon the test started, no other daemon answered instead)."""
    assert status_json(runtime) == []
    assert runtime.bindspaces() == []
    if daemon is not None:
        assert daemon_status(runtime).daemon_pid == daemon.pid


def assert_no_leak_report(result: pytest.RunResult) -> None:
    """A clean run says so in one short line, and says nothing else (but
    the report header naming its session)."""
    ours = [
        line for line in result.outlines
        if (line.startswith("tractor-session") and not line.startswith(HEADER)) or LEAK_HEADER in line
    ]
    assert ours == [CLEAN_LINE], result.stdout.str()


# -- 1. two runs at once ------------------------------------------------------

HOLDER = '''
"""Bind the session's registry address, found in the inherited envelope
(no arguments), and hold it until stdin closes."""
import os
import socket
import sys

from tractor_session.envelope import load_rtvars

rtvars = load_rtvars(os.environ)
addr = rtvars._registry_addrs[0]
if rtvars._enable_tpts == ["uds"]:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.path.join(*addr))
else:
    sock = socket.socket(socket.AF_INET)
    sock.bind(addr)
sock.listen()
print("bound", rtvars._session_uuid, flush=True)
sys.stdin.read()
sock.close()
if rtvars._enable_tpts == ["uds"]:
    os.unlink(os.path.join(*addr))  # a clean exit leaves nothing behind
'''

HOLD_TEST = '''
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import tshelp


def test_hold_registry(tractor_session_lease, tractor_session_reg_addr):
    me, peer = os.environ["TS_RUN"], os.environ["TS_PEER"]
    holder = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("holder.py"))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().split() == ["bound", tractor_session_lease.lease_id]
        tshelp.record(me, tshelp.lease_info(tractor_session_lease))
        # Both runs hold their registry address at the same time.
        tshelp.wait_for(lambda: tshelp.read(peer), what=f"run {peer} to bind")
        if tractor_session_lease.transport == "tcp":
            family, addr = socket.AF_INET, tractor_session_reg_addr
        else:
            family, addr = socket.AF_UNIX, os.path.join(*tractor_session_reg_addr)
        # the holder really has it: it accepts, and nobody else can bind it
        with socket.socket(family) as client:
            client.settimeout(5)
            client.connect(addr)
        with socket.socket(family) as probe, pytest.raises(OSError):
            probe.bind(addr)
        assert holder.poll() is None
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=10)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
'''


def test_two_runs_at_once_get_private_sessions(inner: pytest.Pytester, runtime: Runtime) -> None:
    inner.makepyfile(holder=HOLDER, test_hold=HOLD_TEST)
    tcp_run = start(inner, runtime, "--tractor-session", "test_hold.py", env={"TS_RUN": "tcp", "TS_PEER": "uds"})
    uds_run = start(
        inner, runtime, "--tractor-session", "--tractor-session-transport", "uds", "test_hold.py",
        env={"TS_RUN": "uds", "TS_PEER": "tcp"},
    )
    results = {"tcp": finish(tcp_run), "uds": finish(uds_run)}
    for result in results.values():
        assert result.ret == 0, result.stdout.str() + result.stderr.str()
        result.assert_outcomes(passed=1)
        assert_no_leak_report(result)

    tcp, uds = out(inner, "tcp"), out(inner, "uds")
    assert tcp["transport"] == "tcp" and uds["transport"] == "uds"
    assert not tcp["inherited"] and not uds["inherited"]
    assert tcp["lease_id"] != uds["lease_id"]
    assert tcp["bindspace"] != uds["bindspace"]
    assert {Path(tcp["bindspace"]).parent, Path(uds["bindspace"]).parent} == {runtime.root}
    host, port = tcp["registry_addr"]
    assert host == "127.0.0.1" and isinstance(port, int) and port > 0
    # the uds registry lives inside its own run's bindspace (a uds lease takes no port)
    assert uds["registry_addr"] == [str(Path(uds["bindspace"]) / "tractor"), "registry@1616.sock"]
    # the two runs raced to autostart a daemon: exactly one serves the root
    daemons = [
        p for p in psutil.process_iter(["cmdline"])
        if "serve" in (p.info["cmdline"] or []) and str(runtime.root) in (p.info["cmdline"] or [])
    ]
    assert [p.pid for p in daemons] == [runtime.daemon_pid()]
    assert_all_released(runtime)


# -- 2. xdist: a lease per worker ---------------------------------------------

XDIST_TEST = '''
import os

import pytest

import tshelp
from tractor_session.envelope import load_rtvars

WORKERS = 4
first_test_of_this_worker = True


def all_workers_recorded(prefix):
    found = {rec["worker"] for rec in map(tshelp.read, (f"{prefix}{i}" for i in range(8))) if rec}
    return len(found) == WORKERS


@pytest.mark.parametrize("i", range(8))
def test_worker_lease(i, tractor_session_lease):
    global first_test_of_this_worker
    info = tshelp.lease_info(tractor_session_lease)
    # the worker's own envelope is the one in os.environ
    info["env_rtvars_session"] = load_rtvars(os.environ)._session_uuid
    tshelp.record(f"t{i}", info)
    if first_test_of_this_worker:
        first_test_of_this_worker = False
        # Each worker's first test holds its worker here until all four
        # have recorded what the daemon shows while all four are running
        # (a worker with nothing left to do exits and releases its lease).
        tshelp.wait_for(lambda: all_workers_recorded("t"), what="all four workers")
        tshelp.record(f"s{i}", {"worker": info["worker"], "status": tshelp.status()})
        tshelp.wait_for(lambda: all_workers_recorded("s"), what="all four status snapshots")
'''


def test_xdist_gives_every_worker_its_own_lease(
    inner: pytest.Pytester, runtime: Runtime, daemon: subprocess.Popen[bytes],
) -> None:
    inner.makepyfile(test_xdist=XDIST_TEST)
    proc = start(inner, runtime, "-n", "4", "--tractor-session", "test_xdist.py")
    result = finish(proc)
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=8)
    assert_no_leak_report(result)

    records = [out(inner, f"t{i}") for i in range(8)]
    by_worker: dict[str, set[str]] = {}
    for rec in records:
        assert rec["env_session_id"] == rec["lease_id"] == rec["env_rtvars_session"]
        assert not rec["inherited"]
        by_worker.setdefault(rec["worker"], set()).add(rec["lease_id"])
    assert sorted(by_worker) == ["gw0", "gw1", "gw2", "gw3"]
    assert all(len(ids) == 1 for ids in by_worker.values()), by_worker
    worker_leases = {next(iter(ids)) for ids in by_worker.values()}
    assert len(worker_leases) == 4
    per_lease = {rec["lease_id"]: rec for rec in records}
    assert len({per_lease[i]["bindspace"] for i in worker_leases}) == 4
    assert len({tuple(per_lease[i]["registry_addr"]) for i in worker_leases}) == 4

    # during the run: the run's own lease (held by the controller) and four
    # worker leases, each shown as belonging to it
    snapshots = [out(inner, f"s{i}") for i in range(8) if (inner.path / "out" / f"s{i}.json").exists()]
    assert sorted(snap["worker"] for snap in snapshots) == ["gw0", "gw1", "gw2", "gw3"]
    leases = snapshots[0]["status"]
    assert all(snap["status"] == leases for snap in snapshots)
    # The run's lease is held by the process started (it re-executed
    # itself as `tractor-session lease -- pytest ...`) and bound to the
    # pytest inside it.
    (run_lease,) = [lease for lease in leases if lease["parent"] is None]
    assert run_lease["holder_pid"] not in (None, proc.pid)
    children = [lease for lease in leases if lease["parent"] is not None]
    assert {lease["lease_id"] for lease in children} == worker_leases
    assert {lease["parent"] for lease in children} == {run_lease["lease_id"]}
    assert {lease["holder_pid"] for lease in children} == {per_lease[i]["pid"] for i in worker_leases}
    assert len(leases) == 5

    assert_all_released(runtime, daemon)


# -- 3. a worker killed mid-run -------------------------------------------------

CRASH_TEST = '''
import os
import signal
from pathlib import Path

import tshelp

# `-n 2` with xdist's default `--dist load` sends tests 0 and 1 to one worker
# and 2 and 3 to the other; test 1 is then rescheduled to the worker that
# replaces the crashed one.


def test_0_crash(tractor_session_lease):
    tshelp.record("crashed", tshelp.lease_info(tractor_session_lease))
    os.kill(os.getpid(), signal.SIGKILL)


def test_1_replacement(tractor_session_lease):
    info = tshelp.lease_info(tractor_session_lease)
    info["status"] = tshelp.status()
    tshelp.record("replacement", info)


def test_2_steady(tractor_session_lease):
    me = tshelp.lease_info(tractor_session_lease)
    tshelp.record("steady1", me)
    crashed = tshelp.wait_for(lambda: tshelp.read("crashed"), what="the crash")
    tshelp.wait_for(
        lambda: not Path(crashed["bindspace"]).exists(),
        what="the crashed worker's bindspace to be removed",
    )
    # while this worker goes on, the daemon no longer knows the crashed lease
    leases = tshelp.wait_for(
        lambda: (s := tshelp.status()) and crashed["lease_id"] not in {l["lease_id"] for l in s} and s,
        what="the crashed worker's lease to end",
    )
    tshelp.record("status", leases)
    assert Path(me["bindspace"]).is_dir()


def test_3_steady(tractor_session_lease):
    tshelp.record("steady2", tshelp.lease_info(tractor_session_lease))
'''


def test_killed_worker_loses_its_lease_and_others_carry_on(
    inner: pytest.Pytester, runtime: Runtime, daemon: subprocess.Popen[bytes],
) -> None:
    inner.makepyfile(test_crash=CRASH_TEST)
    proc = start(inner, runtime, "-n", "2", "--tractor-session", "test_crash.py")
    result = finish(proc)
    assert result.ret == 1, result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*worker 'gw*' crashed while running 'test_crash.py::test_0_crash'*"])

    crashed, steady1, steady2 = out(inner, "crashed"), out(inner, "steady1"), out(inner, "steady2")
    replacement = out(inner, "replacement")
    assert not pid_alive(crashed["pid"])
    assert not Path(crashed["bindspace"]).exists()
    # the other worker kept its lease throughout
    assert steady1["worker"] == steady2["worker"] != crashed["worker"]
    assert steady1["lease_id"] == steady2["lease_id"] != crashed["lease_id"]
    # the replacement worker has a fresh lease of its own
    assert replacement["worker"] not in (crashed["worker"], steady1["worker"])
    assert replacement["lease_id"] not in (crashed["lease_id"], steady1["lease_id"])
    assert replacement["bindspace"] not in (crashed["bindspace"], steady1["bindspace"])
    # while the run went on: the crashed lease was gone, the steady one was
    # there, and every worker lease belonged to the run's lease
    by_id = {lease["lease_id"]: lease for lease in out(inner, "status")}
    assert crashed["lease_id"] not in by_id
    run_id = by_id[steady1["lease_id"]]["parent"]
    assert run_id is not None and by_id[run_id]["parent"] is None
    seen_by_replacement = {lease["lease_id"]: lease for lease in replacement["status"]}
    assert crashed["lease_id"] not in seen_by_replacement
    assert seen_by_replacement[replacement["lease_id"]]["parent"] == run_id

    assert_all_released(runtime, daemon)


# -- 4. the leak report -------------------------------------------------------

LEAK_TEST = '''
import socket
import subprocess
import sys

import tshelp

BLOCKER = "import signal; print('ready', flush=True); signal.pause()"


def test_leaves_things_behind(tractor_session_lease):
    proc = subprocess.Popen(
        [sys.executable, "-c", BLOCKER], stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    assert proc.stdout.readline() == "ready\\n"
    path = tractor_session_lease.bindspace / "tractor" / "leaky@1.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()  # and never unlinked
    tshelp.record("leak", {"pid": proc.pid, "socket": str(path), "bindspace": str(tractor_session_lease.bindspace)})
'''


def test_leak_report_lists_leftovers_and_the_session_end_removes_them(
    inner: pytest.Pytester, runtime: Runtime, daemon: subprocess.Popen[bytes],
) -> None:
    """With leftovers only reported per test (test_leaks.py has the per-test
    reaping), what is still there at the end is listed too, and the
    session's end removes it."""
    inner.makepyfile(test_leak=LEAK_TEST)
    leak: dict[str, Any] | None = None
    try:
        result = run(inner, "--tractor-session", "--tractor-session-leaks=report", "test_leak.py")
        leak = out(inner, "leak")
        assert result.ret == 0, result.stdout.str() + result.stderr.str()
        result.assert_outcomes(passed=1)
        text = result.stdout.str()
        assert LEAK_HEADER in text
        assert CLEAN_LINE not in text
        assert "test_leak.py::test_leaves_things_behind: 2 leftover(s)" in text
        result.stdout.fnmatch_lines([
            f"socket {leak['socket']}",
            f"process {leak['pid']}: *signal.pause()*",
            "2 leftover(s); the session's end cleans them up",
        ], consecutive=False)
        # the session's end took both with it
        wait_for(lambda: not pid_alive(leak["pid"]), what="the leaked process to be reaped")
        assert not Path(leak["socket"]).exists()
        assert not Path(leak["bindspace"]).exists()
        assert_all_released(runtime, daemon)
    finally:
        if leak is not None and pid_alive(leak["pid"]):
            kill_tree(leak["pid"])


# -- 5. under `tractor-session lease --` --------------------------------------

INHERIT_TEST = '''
import os

import tshelp


def test_inherited(tractor_session_lease, tractor_session_reg_addr):
    assert tractor_session_lease.inherited is True
    assert tractor_session_lease.lease_id == os.environ["TRACTOR_SESSION_ID"]
    info = tshelp.lease_info(tractor_session_lease)
    info["reg_addr"] = list(tractor_session_reg_addr)
    info["status"] = tshelp.status()
    tshelp.record("inherited", info)
'''


def test_run_under_cli_lease_takes_no_second_lease(
    inner: pytest.Pytester, runtime: Runtime, daemon: subprocess.Popen[bytes],
) -> None:
    inner.makepyfile(test_inherit=INHERIT_TEST)
    proc = runtime.cli(
        "lease", "--", sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--tractor-session", "test_inherit.py",
        env=dict(os.environ), cwd=inner.path, timeout=RUN_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout

    rec = out(inner, "inherited")
    assert rec["inherited"] is True
    assert rec["lease_id"] == rec["env_session_id"]
    (only,) = rec["status"]
    assert only["lease_id"] == rec["lease_id"]
    assert only["bindspace"] == rec["bindspace"]
    assert only["registry_addr"] == rec["reg_addr"]
    assert_all_released(runtime, daemon)


@pytest.mark.parametrize("asked", [["--tractor-session-transport", "tcp"], ["--tractor-session-net", "private"]])
def test_an_inherited_session_unlike_what_the_run_asks_for_is_named(
    inner: pytest.Pytester, runtime: Runtime, daemon: subprocess.Popen[bytes], asked: list[str],
) -> None:
    """`lease --tpt-proto uds -- pytest --tractor-session ...tcp`: the run
    goes on in the inherited uds session, and says so, naming both."""
    inner.makepyfile(test_inherit=INHERIT_TEST)
    proc = runtime.cli(
        "lease", "--tpt-proto", "uds", "--", sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
        "--tractor-session", *asked, "test_inherit.py",
        env=dict(os.environ), cwd=inner.path, timeout=RUN_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rec = out(inner, "inherited")
    assert rec["transport"] == "uds"
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "tractor-session: warning:" in line]
    assert warnings, proc.stdout + proc.stderr
    if asked[-1] == "tcp":
        assert "asked for transport tcp" in warnings[0] and "inherited uds session" in warnings[0]
    else:
        assert "asked for a private network" in warnings[0] and "shares the host's network" in warnings[0]
    assert rec["lease_id"].replace("-", "")[:12] in warnings[0]


# -- 6. beside tractor's own plugin ---------------------------------------------

# A stand-in for `tractor._testing.pytest`: the same option and fixture names.
# "main" copies tractor's current `--tpt-proto` (nargs='+', a list); "legacy"
# an older one (a single string).
STANDIN = '''
import pytest

TPT_PROTO = {tpt_proto}
STANDIN_REG_ADDR = ("127.0.0.1", 1616)


def pytest_addoption(parser):
    parser.addoption("--spawn-backend", action="store", dest="spawn_backend", default="trio")
    parser.addoption("--tpdb", "--debug-mode", action="store_true", dest="tractor_debug_mode")
    parser.addoption("--enable-stackscope", action="store_true", dest="enable_stackscope", default=False)
    parser.addoption("--tpt-proto", **TPT_PROTO)
    parser.addoption("--ll", "--loglevel", action="store", dest="loglevel", default=None)
    parser.addoption("--tl", "--tractor-loglevel", action="store", dest="tractor_loglevel", default=None)


def pytest_configure(config):
    assert config.option.spawn_backend == "trio"


@pytest.fixture(scope="session")
def debug_mode(request):
    return request.config.option.tractor_debug_mode


@pytest.fixture(scope="session", autouse=True)
def loglevel(request):
    tl = request.config.option.tractor_loglevel
    return tl if tl is not None else request.config.option.loglevel


@pytest.fixture(scope="session", autouse=True)
def tpt_proto(request):
    protos = request.config.getoption("--tpt-proto")
    return protos[0] if isinstance(protos, list) else protos


@pytest.fixture(scope="session")
def reg_addr(tpt_proto):
    return STANDIN_REG_ADDR


def pytest_generate_tests(metafunc):
    if "start_method" in metafunc.fixturenames:
        metafunc.parametrize("start_method", [metafunc.config.option.spawn_backend], scope="session")
'''

TPT_PROTO_MAIN = "dict(nargs='+', action='store', dest='tpt_protos', default=['tcp'])"
TPT_PROTO_LEGACY = "dict(action='store', dest='tpt_proto', default='tcp')"

TRACTOR_OPTIONS = ("--spawn-backend", "trio", "--tpdb", "--enable-stackscope", "--ll", "info", "--tl", "cancel")

COEXIST_TEST = '''
import tshelp
from conftest import STANDIN_REG_ADDR


def test_both_plugins(reg_addr, tpt_proto, loglevel, debug_mode, start_method, tractor_session_lease, tractor_session_reg_addr):
    # tractor's fixtures are tractor's ...
    assert reg_addr == STANDIN_REG_ADDR
    assert (tpt_proto, loglevel, debug_mode, start_method) == ("uds", "cancel", True, "trio")
    # ... and the session follows tractor's --tpt-proto
    assert tractor_session_lease.transport == "uds"
    assert tractor_session_reg_addr == (str(tractor_session_lease.bindspace / "tractor"), "registry@1616.sock")
    tshelp.record("coexist", tshelp.lease_info(tractor_session_lease))
'''


def test_tractor_plugin_names_do_not_clash(inner: pytest.Pytester, runtime: Runtime) -> None:
    """Both plugins load side by side: every option of both parses, the ini
    name is ours, and the fixtures of both are listed."""
    inner.makeconftest(STANDIN.format(tpt_proto=TPT_PROTO_MAIN))
    inner.makepyfile(test_names="""
        def test_names(reg_addr, tpt_proto, loglevel, debug_mode, start_method, pytestconfig):
            assert (tpt_proto, loglevel, debug_mode, start_method) == ("uds", "cancel", True, "trio")
            assert pytestconfig.getoption("tractor_session_transport") == "tcp"
            assert pytestconfig.getoption("tractor_session") is False
            assert pytestconfig.getini("tractor_session") is False
    """)
    result = run(inner, *TRACTOR_OPTIONS, "--tpt-proto", "uds", "--tractor-session-transport", "tcp", "test_names.py")
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=1)

    listed = run(inner, "--fixtures", "test_names.py")
    assert listed.ret == 0, listed.stderr.str()
    names = {line.split()[0] for line in listed.outlines if line and not line[0].isspace()}
    assert {"reg_addr", "tpt_proto", "loglevel", "debug_mode"} <= names
    assert {"tractor_session_lease", "tractor_session_rtvars", "tractor_session_reg_addr", "tractor_session_env"} <= names
    assert_no_daemon(runtime)


@pytest.mark.parametrize("tpt_proto", [
    pytest.param(TPT_PROTO_LEGACY, id="legacy-str"),
    pytest.param(TPT_PROTO_MAIN, id="tractor-main-list"),
])
def test_lease_follows_tractors_tpt_proto(
    inner: pytest.Pytester, runtime: Runtime, daemon: subprocess.Popen[bytes], tpt_proto: str,
) -> None:
    inner.makeconftest(STANDIN.format(tpt_proto=tpt_proto))
    inner.makepyfile(test_coexist=COEXIST_TEST)
    result = run(inner, "--tractor-session", *TRACTOR_OPTIONS, "--tpt-proto=uds", "test_coexist.py")
    assert "could not take a lease" not in result.stdout.str() + result.stderr.str()
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=1)
    assert out(inner, "coexist")["transport"] == "uds"
    assert_all_released(runtime, daemon)


# -- 7. inert unless asked ----------------------------------------------------

PLAIN_TEST = '''
import os


def test_no_session():
    assert "_TRACTOR_RT_VARS" not in os.environ
    assert "TRACTOR_SESSION_ID" not in os.environ
    assert "TRACTOR_SESSION_SOCKET" not in os.environ
'''


def assert_no_daemon(runtime: Runtime) -> None:
    assert runtime.daemon_pid() is None
    assert not runtime.socket.exists()
    assert not runtime.control.exists()
    assert not runtime.root.exists()


def test_inert_without_flag_ini_or_fixture(inner: pytest.Pytester, runtime: Runtime) -> None:
    inner.makepyfile(test_plain=PLAIN_TEST)
    result = run(inner, "test_plain.py")
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=1)
    assert CLEAN_LINE not in result.stdout.str()
    assert LEAK_HEADER not in result.stdout.str()
    assert_no_daemon(runtime)


def test_disabled_with_p_no(inner: pytest.Pytester, runtime: Runtime) -> None:
    inner.makepyfile(test_plain=PLAIN_TEST, test_wants="def test_wants(tractor_session_lease):\n    pass\n")
    flagged = run(inner, "-p", "no:tractor_session", "--tractor-session", "test_plain.py")
    assert flagged.ret == pytest.ExitCode.USAGE_ERROR
    assert "unrecognized arguments: --tractor-session" in flagged.stderr.str()

    result = run(inner, "-p", "no:tractor_session", "test_plain.py", "test_wants.py")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*fixture 'tractor_session_lease' not found*"])
    assert_no_daemon(runtime)


def test_ini_activates_it(inner: pytest.Pytester, runtime: Runtime) -> None:
    inner.makeini("[pytest]\ntractor_session = true\n")
    inner.makepyfile(test_ini='''
        import os

        import tshelp
        from tractor_session.envelope import load_rtvars


        def test_in_a_session():
            # no fixture asked for: the envelope is there from start-up
            rtvars = load_rtvars(os.environ)
            assert rtvars._session_uuid == os.environ["TRACTOR_SESSION_ID"]
            tshelp.record("ini", {"status": tshelp.status(), "id": rtvars._session_uuid, "pid": os.getpid()})
    ''')
    result = run(inner, "test_ini.py")
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=1)
    assert_no_leak_report(result)
    rec = out(inner, "ini")
    (lease,) = rec["status"]
    assert lease["lease_id"] == rec["id"] and lease["holder_pid"] == rec["pid"]
    assert_all_released(runtime)


def test_fixture_activates_it_lazily(inner: pytest.Pytester, runtime: Runtime) -> None:
    inner.makepyfile(test_lazy='''
        import os

        from tractor_session.envelope import load_rtvars


        def test_1_before():
            assert "_TRACTOR_RT_VARS" not in os.environ


        def test_2_lazy(tractor_session_reg_addr):
            rtvars = load_rtvars(os.environ)
            assert rtvars._registry_addrs == [tractor_session_reg_addr]
            assert rtvars._session_uuid == os.environ["TRACTOR_SESSION_ID"]


        def test_3_after():
            # session scope: the envelope stays for the rest of the run
            assert "_TRACTOR_RT_VARS" in os.environ
    ''')
    result = run(inner, "test_lazy.py")
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=3)
    assert_no_leak_report(result)
    assert runtime.daemon_pid() is not None
    assert_all_released(runtime)


# -- 8. pytest-trio -------------------------------------------------------------

TRIO_TEST = '''
import os
import sys

import pytest
import trio

from tractor_session.envelope import RuntimeVars, load_rtvars


@pytest.mark.trio
async def test_trio(tractor_session_rtvars, tractor_session_env, tractor_session_reg_addr, tractor_session_lease):
    assert isinstance(tractor_session_rtvars, RuntimeVars)
    kwargs = tractor_session_rtvars.as_kwargs()
    assert kwargs["registry_addrs"] == [tractor_session_reg_addr]
    assert kwargs["enable_transports"] == [tractor_session_lease.transport] == ["tcp"]
    assert tractor_session_rtvars._session_uuid == tractor_session_lease.lease_id
    # the registry address is free and bindable from trio
    host, port = tractor_session_reg_addr
    listeners = await trio.open_tcp_listeners(port, host=host)
    stream = await trio.open_tcp_stream(host, port)
    await stream.aclose()
    for listener in listeners:
        await listener.aclose()
    # a child started with the env copy sees the same envelope
    child = await trio.run_process(
        [sys.executable, "-c", "import os, sys; sys.stdout.write(os.environ['_TRACTOR_RT_VARS'])"],
        env=tractor_session_env, capture_stdout=True,
    )
    assert load_rtvars({"_TRACTOR_RT_VARS": child.stdout.decode()}) == tractor_session_rtvars


def test_plain(tractor_session_rtvars, tractor_session_reg_addr):
    assert tractor_session_rtvars.as_kwargs()["registry_addrs"] == [tractor_session_reg_addr]
'''


def test_works_with_pytest_trio(inner: pytest.Pytester, runtime: Runtime, daemon: subprocess.Popen[bytes]) -> None:
    inner.makepyfile(test_trio=TRIO_TEST)
    result = run(inner, "test_trio.py")
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=2)
    assert_no_leak_report(result)
    assert_all_released(runtime, daemon)


# -- 9. the environment ---------------------------------------------------------

ENV_CONFTEST = '''
import os

import pytest

import tshelp


def snapshot():
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    tshelp.record("before", snapshot())


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    tshelp.record("after", snapshot())
'''

ENV_TEST = '''
import os
import subprocess
import sys

import tshelp


def test_a_mutates_its_copy(tractor_session_env, tractor_session_lease):
    env = tractor_session_env
    assert env is not os.environ
    assert env["_TRACTOR_RT_VARS"] == os.environ["_TRACTOR_RT_VARS"]
    assert env["XDG_RUNTIME_DIR"] == os.environ["XDG_RUNTIME_DIR"] == str(tractor_session_lease.bindspace)
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ['TRACTOR_SESSION_ID'])"],
        env=env, capture_output=True, text=True, check=True,
    )
    assert child.stdout.strip() == tractor_session_lease.lease_id
    tshelp.record("during", {"xdg": os.environ["XDG_RUNTIME_DIR"], "bindspace": str(tractor_session_lease.bindspace)})
    env["TS_MUTATED"] = "1"
    del env["_TRACTOR_RT_VARS"]
    env["XDG_RUNTIME_DIR"] = "/nonexistent"
    assert "TS_MUTATED" not in os.environ
    assert "_TRACTOR_RT_VARS" in os.environ
    assert os.environ["XDG_RUNTIME_DIR"] == str(tractor_session_lease.bindspace)


def test_b_gets_a_fresh_copy(tractor_session_env, tractor_session_lease):
    assert "TS_MUTATED" not in tractor_session_env
    assert tractor_session_env["_TRACTOR_RT_VARS"] == os.environ["_TRACTOR_RT_VARS"]
    assert tractor_session_env["XDG_RUNTIME_DIR"] == str(tractor_session_lease.bindspace)
'''


def test_environment_copies_are_fresh_and_os_environ_is_restored(
    inner: pytest.Pytester, runtime: Runtime, daemon: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch,
) -> None:
    xdg = runtime.base / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    inner.makeconftest(ENV_CONFTEST)
    inner.makepyfile(test_env=ENV_TEST)
    result = run(inner, "--tractor-session", "test_env.py")
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=2)

    # The run re-executed itself inside its session: the envelope is in
    # os.environ from the start (conftests included), and stays to the end.
    before, during, after = out(inner, "before"), out(inner, "during"), out(inner, "after")
    assert during["xdg"] == during["bindspace"] != str(xdg)
    assert before["XDG_RUNTIME_DIR"] == during["bindspace"]
    for name in ("_TRACTOR_RT_VARS", "TRACTOR_SESSION_ID", "TRACTOR_SESSION_SOCKET"):
        assert name in before
    assert after == before
    assert_all_released(runtime, daemon)
