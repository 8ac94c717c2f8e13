"""Real tractor actor trees under tractor-session: isolation and reaping.

tractor needs Python 3.13, and our own tests may run on an older Python,
so these tests drive a separate interpreter that has tractor and this
package installed (``TRACTOR_SESSION_TEST_PYTHON``, default
``.venv-tractor/bin/python`` in the repository; see the README).  Without
it they skip and say how to set it up, except in CI (``CI`` set), where a
skip would hide that they never ran: there they fail.

What they show, each against a real daemon in a private runtime root:

- two unmodified trees on tractor's TCP defaults merge into one registry on
  the host's network, and stay apart under ``lease --net private``;
- two pytest runs of tractor tests at once, with the plugin, on tcp (with a
  private network) and on uds: both pass, each run's sockets in its own
  bindspace, the root actor's and its subactors' in the same one, also
  with tractor's own pytest plugin loaded first, and under xdist;
- a SIGKILLed root actor (under ``lease`` and under the plugin) leaves no
  actor, socket, bindspace or network namespace behind, though tractor's
  subactors blank their environment;
- a daemon started by a run that loads tractor's plugin outlives it;
- a second client brought into a private-network session with ``exec``
  finds the tree's actors in its registry, and ``ps`` shows the subactor
  under its root by the title tractor gave it.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import DEADLINE, Runtime, pid_alive, wait_for

REPO = Path(__file__).resolve().parent.parent
TREE = Path(__file__).resolve().parent / "tractor_programs" / "tree.py"
PYTHON_ENV = "TRACTOR_SESSION_TEST_PYTHON"
RUN_TIMEOUT = 180.0

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and namespaces")


@functools.cache
def _find_tractor_python() -> tuple[str | None, str]:
    python = os.environ.get(PYTHON_ENV) or str(REPO / ".venv-tractor" / "bin" / "python")
    if not os.path.exists(python):
        return None, f"no interpreter at {python}"
    done = subprocess.run(
        [python, "-c", "import tractor, tractor_session, pytest, xdist"],
        capture_output=True, text=True, timeout=120,
    )
    if done.returncode != 0:
        return None, f"{python} cannot import tractor, tractor_session, pytest and xdist: {done.stderr.strip()[-300:]}"
    return python, ""


@pytest.fixture(scope="module")
def tpy() -> str:
    """The interpreter with real tractor."""
    python, why = _find_tractor_python()
    if python is None:
        message = (
            f"real-tractor tests need a Python 3.13 environment with tractor and this package: {why}."
            " Create it with `python3.13 -m venv .venv-tractor && .venv-tractor/bin/pip install"
            f" <tractor wheel> -e '.[test]'`, or point {PYTHON_ENV} at one."
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return python


@pytest.fixture
def env(runtime: Runtime) -> dict[str, str]:
    """The runtime's environment without anything of an outer session or
    pytest run; tractor's warnings (no XDG_RUNTIME_DIR) kept quiet."""
    drop = ("XDG_RUNTIME_DIR", "PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT")
    return {**{k: v for k, v in runtime.env.items() if k not in drop}, "PYTHONWARNINGS": "ignore"}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def end_all(pids: list[int]) -> None:
    """SIGKILL what a test started that may have left its process tree."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def netns_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def processes_in_netns(netns: str) -> list[int]:
    return [p.pid for p in psutil.process_iter() if netns_of(p.pid) == netns]


def no_session_left(runtime: Runtime) -> bool:
    return not runtime.bindspaces()


# -- two unmodified trees on TCP defaults -------------------------------------------


def start_tree(
    runtime: Runtime, tpy: str, env: dict[str, str], out: Path, name: str, peer: str, *lease: str,
) -> subprocess.Popen[bytes]:
    command = [tpy, str(TREE), name, str(out / f"{name}.json"), peer]
    if lease:
        command = [tpy, "-m", "tractor_session", "lease", *lease, "--", *command]
    return runtime.popen(command, env=env, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)


def run_two_trees(
    runtime: Runtime, tpy: str, env: dict[str, str], tmp_path: Path, *lease: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tree A up, then tree B up beside it; their reports once B has looked
    for A's subactor (or given up being found by a merged registry)."""
    first = start_tree(runtime, tpy, env, tmp_path, "A", "B", *lease)
    a = wait_for(lambda: read_json(tmp_path / "A.json"), timeout=60, what="tree A up")
    second = start_tree(runtime, tpy, env, tmp_path, "B", "A", *lease)
    b = wait_for(lambda: read_json(tmp_path / "B.json"), timeout=60, what="tree B up")
    if not b["is_registrar"]:
        # B joined a registry it did not start: it sees A's subactor there.
        b = wait_for(lambda: (r := read_json(tmp_path / "B.json")) and r["peer_seen"] and r, what="B to see A's subactor")
    pids = [a["pid"], a["sub_pid"], b["pid"], b["sub_pid"]]
    try:
        for proc in (first, second):
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in (first, second):
            assert proc.wait(timeout=60) == 0
    finally:
        end_all(pids)
    return a, b


def test_unmodified_tcp_trees_merge_on_the_host_network(runtime: Runtime, tpy: str, env: dict[str, str], tmp_path: Path) -> None:
    """Why --net private exists (and proof that the test below can fail)."""
    a, b = run_two_trees(runtime, tpy, env, tmp_path)
    assert a["is_registrar"] and not b["is_registrar"]
    assert b["peer_seen"]


def test_unmodified_tcp_trees_stay_apart_with_a_private_network(
    runtime: Runtime, tpy: str, env: dict[str, str], tmp_path: Path,
) -> None:
    a, b = run_two_trees(runtime, tpy, env, tmp_path, "--net", "private")
    # Each root became the registrar at 127.0.0.1:1616 of its own network.
    assert a["is_registrar"] and b["is_registrar"]
    assert a["xdg"] != b["xdg"]
    wait_for(lambda: no_session_left(runtime), what="both sessions to end")


# -- pytest runs of tractor tests, with the plugin -----------------------------------

TRACTOR_TESTS = '''
"""Tests that open root actors on tractor's defaults and spawn subactors.
The first test of each run (of each xdist worker) waits, with its tree
up, until the other run's tree is up too, so the two overlap."""
import glob
import json
import os
import time

import pytest
import trio
import tractor

OUT = os.environ["TS_OUT"]
RUN = os.environ["TS_RUN"]
PEER = os.environ.get("TS_PEER")
TPT = os.environ.get("TS_TPT", "tcp")


def record(name, data):
    tmp = os.path.join(OUT, f"{name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.rename(tmp, os.path.join(OUT, f"{name}.json"))


def wait_for_file(name, timeout=90):
    deadline = time.monotonic() + timeout
    while not os.path.exists(os.path.join(OUT, f"{name}.json")):
        assert time.monotonic() < deadline, f"no {name} within {timeout} s"
        time.sleep(0.02)


async def ping():
    return os.getpid()


# The session's socket directory, and where tractor binds outside one.
PLACES = [os.path.join(os.environ.get("XDG_RUNTIME_DIR", "/nonexistent"), "tractor"),
          f"/run/user/{os.getuid()}/tractor", f"/tmp/runtime-{os.getuid()}/tractor"]
first = True


def sockets():
    """The socket files in each place, by name."""
    return {place: sorted(os.path.basename(p) for p in glob.glob(os.path.join(place, "*.sock"))) for place in PLACES}


@pytest.mark.parametrize("i", range(int(os.environ.get("TS_COUNT", "3"))))
def test_tree(i, worker_id):
    global first
    async def main():
        async with tractor.open_nursery(enable_transports=[TPT]) as nursery:
            portal = await nursery.start_actor(f"sub{i}", enable_modules=[__name__])
            sub_pid = await portal.run(ping)
            info = {
                "run": RUN, "worker": worker_id, "i": i, "pid": os.getpid(), "sub_pid": sub_pid,
                "is_registrar": tractor.current_actor().is_registrar,
                "xdg": os.environ.get("XDG_RUNTIME_DIR"),
                "session": os.environ.get("TRACTOR_SESSION_ID"),
                "netns": os.readlink("/proc/self/ns/net"),
                "sockets": sockets(),
            }
            tag = f"{RUN}-{worker_id}-{i}"
            record(tag, info)
            if first:
                record(f"{RUN}-{worker_id}-up", info)
                if PEER:
                    await trio.to_thread.run_sync(wait_for_file, PEER)
            await portal.cancel_actor()

    trio.run(main)
    first = False
'''


def write_tractor_tests(path: Path) -> None:
    path.mkdir(exist_ok=True)
    (path / "test_trees.py").write_text(TRACTOR_TESTS)
    (path / "out").mkdir(exist_ok=True)


def start_run(
    runtime: Runtime, tpy: str, env: dict[str, str], project: Path, run: str, *args: str, peer: str | None = None,
    tpt: str = "tcp", count: int = 3,
) -> subprocess.Popen[str]:
    run_env = {**env, "TS_OUT": str(project / "out"), "TS_RUN": run, "TS_TPT": tpt, "TS_COUNT": str(count)}
    if peer is not None:
        run_env["TS_PEER"] = peer
    command = [tpy, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--tractor-session", *args, "test_trees.py"]
    return runtime.popen(command, env=run_env, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_run(proc: subprocess.Popen[str]) -> str:
    output, _ = proc.communicate(timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, output
    return output


def assert_one_bindspace(rec: dict[str, Any]) -> None:
    """The root actor (pytest, the registrar: it binds the registry socket)
    and its subactor bound their sockets in the run's bindspace, and none
    elsewhere."""
    here = f"{rec['xdg']}/tractor"
    mine = rec["sockets"][here]
    assert "registry@1616.sock" in mine and f"sub{rec['i']}@{rec['sub_pid']}.sock" in mine, rec
    for place, names in rec["sockets"].items():
        strays = [n for n in names if n.endswith((f"@{rec['pid']}.sock", f"@{rec['sub_pid']}.sock"))]
        assert place == here or not strays, f"bound outside the session, in {place}: {strays}"


def records(project: Path, run: str) -> list[dict[str, Any]]:
    found = [read_json(p) for p in (project / "out").glob(f"{run}-*.json") if not p.name.endswith("-up.json")]
    return [r for r in found if r is not None]


@pytest.mark.parametrize("tpt, net", [("tcp", "private"), ("uds", "host")])
def test_two_plugin_runs_at_once_stay_apart(
    runtime: Runtime, tpy: str, env: dict[str, str], tmp_path: Path, tpt: str, net: str,
) -> None:
    write_tractor_tests(tmp_path)
    args = ["--tractor-session-transport", tpt, "--tractor-session-net", net]
    one = start_run(runtime, tpy, env, tmp_path, "one", *args, peer="two-master-up", tpt=tpt)
    two = start_run(runtime, tpy, env, tmp_path, "two", *args, peer="one-master-up", tpt=tpt)
    for proc in (one, two):
        output = finish_run(proc)
        assert "3 passed" in output, output
    ones, twos = records(tmp_path, "one"), records(tmp_path, "two")
    assert len(ones) == len(twos) == 3
    for mine, theirs in ((ones, twos), (twos, ones)):
        assert len({r["session"] for r in mine}) == 1
        assert {r["session"] for r in mine}.isdisjoint(r["session"] for r in theirs)
        for rec in mine:
            assert Path(rec["xdg"]).parent == runtime.root
            if tpt == "uds":
                assert_one_bindspace(rec)
            else:
                # each run's root was the registrar at 127.0.0.1:1616 of its
                # own network, while the other run was up
                assert rec["is_registrar"], rec
                assert rec["netns"] != theirs[0]["netns"]
    wait_for(lambda: no_session_left(runtime), what="both sessions to end")


def test_tractors_own_plugin_loaded_first(runtime: Runtime, tpy: str, env: dict[str, str], tmp_path: Path) -> None:
    """tractor is imported before our plugin acts: the run re-executes
    itself inside its session, so the root actor in pytest binds there too."""
    write_tractor_tests(tmp_path)
    proc = start_run(runtime, tpy, env, tmp_path, "solo", "-p", "tractor._testing.pytest", "--tpt-proto=uds", tpt="uds")
    output = finish_run(proc)
    assert "3 passed" in output, output
    for rec in records(tmp_path, "solo"):
        assert_one_bindspace(rec)
        assert Path(rec["xdg"]).parent == runtime.root


def test_xdist_workers_get_a_network_each(runtime: Runtime, tpy: str, env: dict[str, str], tmp_path: Path) -> None:
    write_tractor_tests(tmp_path)
    conftest = (
        "import os, pytest\n"
        "@pytest.fixture(autouse=True)\n"
        "def _peer(worker_id, monkeypatch):\n"
        "    other = {'gw0': 'gw1', 'gw1': 'gw0'}[worker_id]\n"
        "    monkeypatch.setattr('test_trees.PEER', f'x-{other}-up')\n"
    )
    (tmp_path / "conftest.py").write_text(conftest)
    proc = start_run(
        runtime, tpy, env, tmp_path, "x", "-n", "2", "--tractor-session-net", "private", count=4,
    )
    output = finish_run(proc)
    assert "4 passed" in output, output
    recs = records(tmp_path, "x")
    assert {r["worker"] for r in recs} == {"gw0", "gw1"}
    by_worker = {w: [r for r in recs if r["worker"] == w] for w in ("gw0", "gw1")}
    assert by_worker["gw0"][0]["netns"] != by_worker["gw1"][0]["netns"]
    assert by_worker["gw0"][0]["session"] != by_worker["gw1"][0]["session"]
    assert all(r["is_registrar"] for r in recs)
    wait_for(lambda: no_session_left(runtime), what="the sessions to end")


# -- a SIGKILLed root actor leaves nothing -------------------------------------------

HANG_TEST = '''
import json
import os

import trio
import tractor


async def ping():
    return os.getpid()


def test_hang():
    async def main():
        async with tractor.open_nursery(enable_transports=[os.environ["TS_TPT"]]) as nursery:
            portal = await nursery.start_actor("sub", enable_modules=[__name__])
            info = {"pid": os.getpid(), "sub_pid": await portal.run(ping), "xdg": os.environ["XDG_RUNTIME_DIR"],
                    "netns": os.readlink("/proc/self/ns/net")}
            with open(os.environ["TS_OUT"] + ".tmp", "w") as f:
                json.dump(info, f)
            os.rename(os.environ["TS_OUT"] + ".tmp", os.environ["TS_OUT"])
            await trio.sleep_forever()

    trio.run(main)
'''


@pytest.mark.parametrize("net", ["private", "host"])
@pytest.mark.parametrize("kill", ["pytest", "run"])
def test_sigkilled_plugin_run_leaves_nothing(
    runtime: Runtime, tpy: str, env: dict[str, str], tmp_path: Path, kill: str, net: str,
) -> None:
    """``pytest``: the root actor (pytest itself) dies, the run's ``lease``
    process sees it and releases; ``run``: the process that was started
    (the ``lease`` that pytest re-executed as) dies, and with it the
    connection that held the lease.  With a private network its namespace
    marks the session's processes; without one, ``lease`` is the orphaned
    subactor's subreaper."""
    (tmp_path / "test_hang.py").write_text(HANG_TEST)
    out = tmp_path / "hang.json"
    proc = runtime.popen(
        [tpy, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--tractor-session",
         "--tractor-session-net", net, "--tractor-session-transport", "uds", "test_hang.py"],
        env={**env, "TS_OUT": str(out), "TS_TPT": "uds"}, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    info = wait_for(lambda: read_json(out), timeout=60, what="the tree up")
    try:
        bindspace = Path(info["xdg"])
        assert list((bindspace / "tractor").glob("*.sock")), "the tree bound no socket in its bindspace"
        assert (info["netns"] != netns_of(os.getpid())) == (net == "private")
        os.kill(info["pid"] if kill == "pytest" else proc.pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(info["sub_pid"]) and not pid_alive(info["pid"]), what="every actor gone")
        wait_for(lambda: not bindspace.exists(), what="the bindspace (and its sockets) gone")
        if net == "private":
            wait_for(lambda: not processes_in_netns(info["netns"]), what="nothing left in the network namespace")
        assert proc.wait(timeout=DEADLINE) != 0
    finally:
        end_all([info["pid"], info["sub_pid"]])


def test_sigkilled_root_actor_under_lease_takes_its_subactor(
    runtime: Runtime, tpy: str, env: dict[str, str], tmp_path: Path,
) -> None:
    """The subactor rewrote its title, which blanks the environment others
    read; orphaned, it is still found: ``lease`` is its subreaper."""
    out = tmp_path / "tree.json"
    proc = runtime.popen(
        [tpy, "-m", "tractor_session", "lease", "--tpt-proto", "uds", "--",
         tpy, str(TREE), "K", str(out)],
        env={**env, "TREE_TPT": "uds"}, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    info = wait_for(lambda: read_json(out), timeout=60, what="the tree up")
    try:
        bindspace = Path(info["xdg"])
        sub = psutil.Process(info["sub_pid"])
        assert "_TRACTOR_RT_VARS" not in sub.environ(), "tractor no longer blanks a subactor's environment"
        assert list((bindspace / "tractor").glob(f"*@{info['sub_pid']}.sock"))
        os.kill(info["pid"], signal.SIGKILL)
        wait_for(lambda: not pid_alive(info["sub_pid"]), what="the orphaned subactor reaped")
        wait_for(lambda: not bindspace.exists(), what="the bindspace (and its sockets) gone")
        assert proc.wait(timeout=DEADLINE) == 128 + signal.SIGKILL
    finally:
        end_all([info["pid"], info["sub_pid"]])


# -- the daemon outlives the harness that started it ---------------------------------

FIXTURE_TEST = '''
import os

import trio
import tractor


async def ping():
    return os.getpid()


def test_with_subactor(tractor_session_lease):
    async def main():
        async with tractor.open_nursery() as nursery:
            portal = await nursery.start_actor("sub", enable_modules=[__name__])
            assert await portal.run(ping) != os.getpid()
            await portal.cancel_actor()

    trio.run(main)
'''


@pytest.mark.parametrize("activation", ["flag", "fixture"])
def test_daemon_started_by_a_run_with_tractors_plugin_survives_it(
    runtime: Runtime, tpy: str, env: dict[str, str], tmp_path: Path, activation: str,
) -> None:
    """tractor's harness SIGINTs pytest's children; a daemon the run started
    must not be one of them."""
    (tmp_path / "test_fix.py").write_text(FIXTURE_TEST)
    assert runtime.daemon_pid() is None
    flags = ["--tractor-session"] if activation == "flag" else []
    done = subprocess.run(
        [tpy, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-p", "tractor._testing.pytest", *flags, "test_fix.py"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    daemon = runtime.daemon_pid()
    assert daemon is not None and pid_alive(daemon)
    wait_for(lambda: no_session_left(runtime), what="the run's lease to end")
    status = runtime.cli("status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout) == [], status


# -- a test that leaks a tractor tree ---------------------------------------------------

LEAKING_TREE_TESTS = '''
import json
import os
import subprocess
import sys
import time

TREE = os.environ["TS_TREE"]
OUT = os.path.join(os.path.dirname(__file__), "out")


def start_tree(name):
    """An actor tree (root and subactor) on uds, as a test's helper script."""
    report = os.path.join(OUT, f"{name}.json")
    proc = subprocess.Popen([sys.executable, TREE, name, report], stdin=subprocess.PIPE,
                            env={**os.environ, "TREE_TPT": "uds"})
    deadline = time.monotonic() + 60
    while not os.path.exists(report):
        assert proc.poll() is None and time.monotonic() < deadline, "the tree did not come up"
        time.sleep(0.02)
    return proc, json.load(open(report))


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


def test_1_leaks_a_tree():
    start_tree("first")   # returns with the tree still up


def test_2_runs_after_it():
    first = json.load(open(os.path.join(OUT, "first.json")))
    assert not alive(first["pid"]) and not alive(first["sub_pid"])
    proc, _ = start_tree("second")
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
'''


def test_a_test_that_leaks_a_tree_is_named_and_the_next_passes(
    runtime: Runtime, tpy: str, env: dict[str, str], tmp_path: Path,
) -> None:
    (tmp_path / "test_leaking.py").write_text(LEAKING_TREE_TESTS)
    (tmp_path / "out").mkdir()
    done = subprocess.run(
        [tpy, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--tractor-session",
         "--tractor-session-transport", "uds", "--tractor-session-leaks-json", str(tmp_path / "leaks.json"),
         "test_leaking.py"],
        env={**env, "TS_TREE": str(TREE)}, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )
    first = read_json(tmp_path / "out" / "first.json")
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        assert "2 passed" in done.stdout
        (leftover,) = json.loads((tmp_path / "leaks.json").read_text())
        assert leftover["nodeid"] == "test_leaking.py::test_1_leaks_a_tree"
        assert {first["pid"], first["sub_pid"]} <= {p["pid"] for p in leftover["processes"]}
        assert "test_leaking.py::test_1_leaks_a_tree" in done.stdout
    finally:
        end_all([first["pid"], first["sub_pid"]] if first else [])


# -- a second client, attached with `exec` ---------------------------------------------

# Opens a root actor on tractor's defaults and prints whether the registry
# it finds at 127.0.0.1:1616 knows the actor argv[1].
ATTACH = """
import sys, trio, tractor
async def main():
    async with tractor.open_root_actor(name="attached"):
        async with tractor.find_actor(sys.argv[1]) as portal:
            print("found" if portal is not None else "missing")
trio.run(main)
"""


def test_a_client_attached_with_exec_finds_the_sessions_registry(
    runtime: Runtime, tpy: str, env: dict[str, str], tmp_path: Path,
) -> None:
    name = f"x{os.getpid()}"  # its subactor is sub-<name>: no other test's
    lease = runtime.popen(
        [tpy, "-m", "tractor_session", "lease", "--net", "private", "--", tpy, str(TREE), name, str(tmp_path / "tree.json")],
        env=env, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    tree = wait_for(lambda: read_json(tmp_path / "tree.json"), timeout=60, what="the tree up")
    assert isinstance(tree, dict)
    try:
        listed = subprocess.run([tpy, "-m", "tractor_session", "status", "--json"], env=env, capture_output=True, text=True)
        (lease_id,) = [info["lease_id"] for info in json.loads(listed.stdout)]
        shown = subprocess.run([tpy, "-m", "tractor_session", "ps", lease_id, "--json"], env=env, capture_output=True, text=True)
        assert shown.returncode == 0, shown.stderr
        procs = {proc["pid"]: proc for proc in json.loads(shown.stdout)["processes"]}
        assert procs[tree["sub_pid"]]["ppid"] == tree["pid"]
        assert f"sub-{name}" in procs[tree["sub_pid"]]["cmdline"], procs[tree["sub_pid"]]

        attached = subprocess.run(
            [tpy, "-m", "tractor_session", "exec", lease_id, "--", tpy, "-c", ATTACH, f"sub-{name}"],
            env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT,
        )
        assert attached.returncode == 0, attached.stderr
        assert attached.stdout.strip() == "found"
        assert lease.stdin is not None
        lease.stdin.close()
        assert lease.wait(timeout=60) == 0
    finally:
        end_all([tree["pid"], tree["sub_pid"]])
    wait_for(lambda: no_session_left(runtime), what="the session to end")
