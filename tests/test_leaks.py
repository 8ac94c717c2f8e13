"""Leftovers named by the test that left them, and gone before the next test.

Each test here runs a real inner pytest run with the plugin against a real
daemon; the inner tests start real processes (a direct child, a grandchild
in a new session, a module-scoped fixture's server) and real unix sockets,
and record their pids as JSON; the next inner test, and the outer test,
check what is alive.  Waits are the inner runs' own ends.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Runtime, pid_alive, wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")

HELPERS = '''
import json, os, socket, subprocess

OUT = os.path.join(os.path.dirname(__file__), "pids.json")


def save(key, value):
    data = json.load(open(OUT)) if os.path.exists(OUT) else {}
    data[key] = value
    json.dump(data, open(OUT, "w"))


def saved():
    return json.load(open(OUT))


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False
'''

LEAKY = '''
import os, socket, subprocess
import pytest
from helpers import alive, save, saved


@pytest.fixture(scope="module")
def server():
    proc = subprocess.Popen(["sleep", "1000"])
    save("module", proc.pid)
    yield proc


def test_a_leaks_a_child():
    save("child", subprocess.Popen(["sleep", "1000"]).pid)


def test_b_leaks_a_grandchild_in_a_new_session():
    out = subprocess.run(["sh", "-c", "setsid sleep 1001 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
    save("grandchild", int(out.stdout))


def test_c_leaks_a_socket_file():
    path = os.path.join(os.environ["XDG_RUNTIME_DIR"], "tractor", "gone@1.sock")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    sock.close()
    save("socket", path)


def test_d_finds_nothing_of_the_earlier_tests(server):
    found = saved()
    assert not alive(found["child"]) and not alive(found["grandchild"])
    assert not os.path.exists(found["socket"])
    assert alive(server.pid)


def test_e_the_module_fixture_lives_on(server):
    assert alive(server.pid)
'''

AFTER = '''
from helpers import alive, saved


def test_z_the_module_fixture_ended_with_its_module():
    assert not alive(saved()["module"])
'''


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "helpers.py").write_text(HELPERS)
    (tmp_path / "test_leaky.py").write_text(LEAKY)
    (tmp_path / "test_zz.py").write_text(AFTER)
    return tmp_path


def inner(runtime: Runtime, project: Path, *args: str, command: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    # Not an xdist worker of ours, whatever runs this test.
    env = {k: v for k, v in runtime.env.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_ADDOPTS"))}
    return subprocess.run(
        [*command, sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--tractor-session",
         "--tractor-session-leaks-json", str(project / "leaks.json"), *args],
        cwd=project, env=env, capture_output=True, text=True, timeout=120,
    )


def leftovers(project: Path) -> dict[str, Any]:
    return {x["nodeid"]: x for x in json.loads((project / "leaks.json").read_text())}


def test_leftovers_are_named_and_gone_before_the_next_test(runtime: Runtime, project: Path) -> None:
    done = inner(runtime, project, "test_leaky.py", "test_zz.py")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 passed" in done.stdout
    found = leftovers(project)
    pids = json.loads((project / "pids.json").read_text())
    assert [p["pid"] for p in found["test_leaky.py::test_a_leaks_a_child"]["processes"]] == [pids["child"]]
    assert [p["pid"] for p in found["test_leaky.py::test_b_leaks_a_grandchild_in_a_new_session"]["processes"]] == [
        pids["grandchild"]
    ]
    assert found["test_leaky.py::test_c_leaks_a_socket_file"]["sockets"] == [pids["socket"]]
    assert [p["pid"] for p in found["test_leaky.py::server (module-scoped fixture)"]["processes"]] == [pids["module"]]
    # The tests that left nothing are not named; the fixture's users are not blamed.
    assert set(found) == {
        "test_leaky.py::test_a_leaks_a_child", "test_leaky.py::test_b_leaks_a_grandchild_in_a_new_session",
        "test_leaky.py::test_c_leaks_a_socket_file", "test_leaky.py::server (module-scoped fixture)",
    }
    assert "tractor-session: leftovers by test" in done.stdout
    assert "test_leaky.py::test_a_leaks_a_child: 1 leftover(s)" in done.stdout
    assert not any(pid_alive(pid) for key, pid in pids.items() if key != "socket")


def test_fail_mode_errors_exactly_the_leaking_tests(runtime: Runtime, project: Path) -> None:
    done = inner(runtime, project, "--tractor-session-leaks=fail", "test_leaky.py", "test_zz.py")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "6 passed, 3 errors" in done.stdout, done.stdout
    for name in ("test_a_leaks_a_child", "test_b_leaks_a_grandchild_in_a_new_session", "test_c_leaks_a_socket_file"):
        assert f"ERROR at teardown of {name}" in done.stdout
    assert "ERROR at teardown of test_d" not in done.stdout and "ERROR at teardown of test_e" not in done.stdout


def test_report_mode_leaves_them_to_the_session_s_end(runtime: Runtime, project: Path) -> None:
    (project / "test_zz.py").unlink()
    (project / "test_leaky.py").write_text(LEAKY.split("def test_c_")[0])
    done = inner(runtime, project, "--tractor-session-leaks=report", "test_leaky.py")
    assert done.returncode == 0, done.stdout + done.stderr
    found = leftovers(project)
    pids = json.loads((project / "pids.json").read_text())
    assert found["test_leaky.py::test_a_leaks_a_child"]["processes"][0]["ended_by"] is None
    assert "left running" in done.stdout
    # ... and the session's end (the run's lease, released) reaped them.
    wait_for(lambda: not pid_alive(pids["child"]) and not pid_alive(pids["grandchild"]), what="the session's end")


def test_xdist_workers_report_their_tests_leftovers(runtime: Runtime, project: Path) -> None:
    (project / "test_leaky.py").write_text(LEAKY.split("def test_c_")[0])
    (project / "test_zz.py").unlink()
    done = inner(runtime, project, "-n", "2", "test_leaky.py")
    assert done.returncode == 0, done.stdout + done.stderr
    found = leftovers(project)
    assert {"test_leaky.py::test_a_leaks_a_child", "test_leaky.py::test_b_leaks_a_grandchild_in_a_new_session"} <= set(found)
    pids = json.loads((project / "pids.json").read_text())
    assert not pid_alive(pids["child"]) and not pid_alive(pids["grandchild"])


def test_under_a_lease_of_the_user_s(runtime: Runtime, project: Path) -> None:
    lease = (sys.executable, "-m", "tractor_session", "lease", "--")
    done = inner(runtime, project, "test_leaky.py", "test_zz.py", command=lease)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 passed" in done.stdout
    assert "test_leaky.py::test_b_leaks_a_grandchild_in_a_new_session" in leftovers(project)
