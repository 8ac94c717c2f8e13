"""``lease --net private``: a network of the session's own, made without
root through an unprivileged user namespace.

Real ``lease`` processes against a real daemon; the commands they run
report what they see as JSON and hold until the test closes their stdin.
The refusal path uses a real kernel refusal: a user namespace whose
``user.max_user_namespaces`` is 0, which limits only what is made inside it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import DEADLINE, Runtime, wait_for

from tractor_session.run import SESSION_ENDED

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="network namespaces are Linux's")

# Binds tractor's default registry address on both loopbacks, asks the
# daemon for its status from inside, reports, and holds until stdin closes.
INSIDE = r"""
import json, os, socket, subprocess, sys
from tractor_session.envelope import load_rtvars
v4 = socket.socket(); v4.bind(("127.0.0.1", 1616)); v4.listen()
v6 = socket.socket(socket.AF_INET6); v6.bind(("::1", 1616)); v6.listen()
status = subprocess.run([sys.executable, "-m", "tractor_session", "status", "--json"], capture_output=True, text=True)
report = {
    "uid": os.getuid(), "gid": os.getgid(), "netns": os.readlink("/proc/self/ns/net"),
    "registry": list(load_rtvars(os.environ)._registry_addrs[0]), "net_env": os.environ["TRACTOR_SESSION_NET"],
    "session": os.environ["TRACTOR_SESSION_ID"], "status": json.loads(status.stdout) if status.returncode == 0 else status.stderr,
}
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump(report, f)
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
sys.stdin.read()
"""


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_private_sessions_each_own_tractors_default_registry(
    runtime: Runtime, daemon: subprocess.Popen[bytes], tmp_path: Path,
) -> None:
    procs = [
        runtime.popen(
            [sys.executable, "-m", "tractor_session", "lease", "--net", "private", "--",
             sys.executable, "-c", INSIDE, str(tmp_path / f"{name}.json")],
            stdin=subprocess.PIPE,
        )
        for name in ("a", "b")
    ]
    a, b = (wait_for(lambda n=name: read_json(tmp_path / f"{n}.json"), what=f"session {name} up") for name in ("a", "b"))
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(timeout=DEADLINE) == 0
    # Both bound 127.0.0.1:1616 and [::1]:1616 at once: each in a network of its own.
    assert a["netns"] != b["netns"] and os.readlink("/proc/self/ns/net") not in (a["netns"], b["netns"])
    assert a["registry"] == b["registry"] == ["127.0.0.1", 1616]
    assert a["net_env"] == b["net_env"] == "private"
    # The user inside is the user outside, to files and to the daemon, which
    # answered a status request from inside (it checks the peer's uid).
    assert (a["uid"], a["gid"]) == (b["uid"], b["gid"]) == (os.getuid(), os.getgid())
    listed = {lease["lease_id"]: lease for lease in a["status"]}
    assert {a["session"], b["session"]} <= set(listed)
    for session in (a["session"], b["session"]):
        assert listed[session]["net"] == "private"
        assert listed[session]["port"] is None  # the pool's ports are the host's
    wait_for(lambda: not runtime.bindspaces(), what="both sessions to end")


def test_the_host_network_is_the_default(runtime: Runtime, daemon: subprocess.Popen[bytes], tmp_path: Path) -> None:
    done = runtime.cli(
        "lease", "--", sys.executable, "-c",
        "import json, os, sys; from tractor_session.envelope import load_rtvars;"
        " print(json.dumps([os.readlink('/proc/self/ns/net'), os.environ['TRACTOR_SESSION_NET'],"
        " list(load_rtvars(os.environ)._registry_addrs[0])]))",
    )
    assert done.returncode == 0, done.stderr
    netns, net, (host, port) = json.loads(done.stdout)
    assert netns == os.readlink("/proc/self/ns/net") and net == "host"
    assert host == "127.0.0.1" and port != 1616  # a pool port of its own


def test_a_private_session_ended_elsewhere_lets_lease_say_why(
    runtime: Runtime, daemon: subprocess.Popen[bytes], tmp_path: Path,
) -> None:
    """The `lease` process shares its session's network, yet it is not the
    session's to reap: it outlives CMD to report the end and exit 124."""
    report = tmp_path / "inside.json"
    cli = runtime.popen(
        [sys.executable, "-m", "tractor_session", "lease", "--net", "private", "--",
         sys.executable, "-c", INSIDE, str(report)],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    inside = wait_for(lambda: read_json(report), what="the private session to start")
    assert runtime.cli("release", inside["session"]).returncode == 0
    assert cli.wait(timeout=DEADLINE) == SESSION_ENDED
    assert cli.stderr is not None and "released by pid" in cli.stderr.read().decode()
    assert not runtime.bindspaces()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux's unshare")
def test_no_user_namespaces_fails_before_the_command_runs(
    runtime: Runtime, daemon: subprocess.Popen[bytes], tmp_path: Path,
) -> None:
    marker = tmp_path / "ran"
    script = 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"'
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "sh", "-c", script, "sh",
         sys.executable, "-m", "tractor_session", "lease", "--net", "private", "--", "touch", str(marker)],
        env=runtime.env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 125, done
    assert "user.max_user_namespaces is 0" in done.stderr and "sysctl" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not marker.exists(), "the command ran on the shared network"
    assert not runtime.bindspaces(), "the lease was not released"
    status = runtime.cli("status", "--json")
    assert json.loads(status.stdout) == []


def test_an_exported_lease_cannot_have_a_private_network(runtime: Runtime, daemon: subprocess.Popen[bytes]) -> None:
    done = runtime.cli("lease", "--export", "--net", "private")
    assert done.returncode == 2
    assert "--net private needs a command" in done.stderr
    assert not runtime.bindspaces()
