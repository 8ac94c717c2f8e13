"""Chaos: leases come and go while the daemon and the holders are SIGKILLed
at random, with gc running now and then; the invariants hold throughout,
and once everything is killed, nothing of any session is left.

Everything is what a user would run: ``lease -- CMD`` processes (whose
command leaves a child behind), ``lease --json --holder-pid`` with a member
process carrying the envelope, ``release``, ``gc``, and the daemon the
clients start on demand, SIGKILLed whenever the dice say so.  Each round
also checks what a live daemon reports: no two live leases share a
bindspace or a port, and every live lease's bindspace exists.

The run is short by default (CI); ``--chaos-seconds 180`` runs it for
three minutes, ``--chaos-seed N`` replays one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from conftest import CLI, RECLAIM, Runtime, lease_env, pid_alive, port_bindable, stop_autostarted_daemon, wait_for

from tractor_session import client

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and pidfds")

# The command a `lease -- CMD` runs: it leaves a child behind, as an actor
# tree does, and both carry the session's envelope.
LEAVES_A_CHILD = ["sh", "-c", "sleep 300 & exec sleep 300"]


@dataclass
class Chaos:
    """What the run started, to kill it at random and to check at the end."""

    runtime: Runtime
    rng: random.Random
    commands: list[subprocess.Popen[bytes]] = field(default_factory=list)  # `lease -- CMD`
    holders: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)  # lease id -> holder
    ports: set[int] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def act(self) -> None:
        action = self.rng.choices(
            [self.lease_command, self.lease_held, self.kill_command, self.kill_holder, self.release,
             self.kill_daemon, self.gc],
            weights=[3, 3, 2, 2, 1, 1, 1],
        )[0]
        self.counts[action.__name__] = self.counts.get(action.__name__, 0) + 1
        action()

    def lease_command(self) -> None:
        transport = self.rng.choice(["uds", "tcp"])
        self.commands.append(self.runtime.popen(
            [*CLI, "lease", "--tpt-proto", transport, "--", *LEAVES_A_CHILD],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        ))

    def lease_held(self) -> None:
        holder = self.runtime.holder()
        res = self.runtime.cli(
            "lease", "--json", "--holder-pid", str(holder.pid), "--tpt-proto", self.rng.choice(["uds", "tcp"]),
        )
        if res.returncode != 0:
            # The daemon was killed under it: a clear error, never a traceback.
            self.check_error("lease --holder-pid", res.stderr)
            return
        lease = json.loads(res.stdout)
        if lease["port"] is not None:
            self.ports.add(lease["port"])
        self.holders[lease["lease_id"]] = holder
        self.runtime.popen(["sleep", "300"], env=lease_env(self.runtime, lease))  # a member

    def kill_command(self) -> None:
        if running := [p for p in self.commands if p.poll() is None]:
            self.rng.choice(running).kill()

    def kill_holder(self) -> None:
        if alive := [lease_id for lease_id, h in self.holders.items() if h.poll() is None]:
            self.holders[self.rng.choice(alive)].kill()

    def release(self) -> None:
        if alive := [lease_id for lease_id, h in self.holders.items() if h.poll() is None]:
            res = self.runtime.cli("release", self.rng.choice(alive))
            if res.returncode != 0:
                self.check_error("release", res.stderr)

    def kill_daemon(self) -> None:
        if (pid := self.runtime.daemon_pid()) is not None:
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not pid_alive(pid), what="the daemon to die")

    def gc(self) -> None:
        res = self.runtime.cli("gc")
        if res.returncode != 0:
            self.check_error("gc", res.stderr)

    def check_error(self, what: str, stderr: str) -> None:
        if "Traceback" in stderr or not stderr.strip():
            self.errors.append(f"{what}: {stderr[-2000:] or 'failed without a word'}")

    def check_invariants(self) -> None:
        """What a live daemon reports is consistent; no daemon is fine."""
        try:
            with client.connect(autostart=False, environ=self.runtime.env) as conn:
                leases = conn.status().leases
        except client.ClientError:
            return  # killed a moment ago; the next client starts another
        bindspaces = [info.bindspace for info in leases]
        ports = [info.port for info in leases if info.port is not None]
        assert len(set(bindspaces)) == len(bindspaces), f"two live leases share a bindspace: {bindspaces}"
        assert len(set(ports)) == len(ports), f"two live leases share a port: {ports}"
        self.ports.update(ports)
        for info in leases:
            # Ended in the instant since the status: then it is gone for good.
            assert Path(info.bindspace).is_dir() or info.lease_id not in self.live_ids(), (
                f"live lease {info.lease_id} has no bindspace"
            )

    def live_ids(self) -> set[str]:
        try:
            with client.connect(autostart=False, environ=self.runtime.env) as conn:
                return {info.lease_id for info in conn.status().leases}
        except client.ClientError:
            return set()

    def kill_everything(self) -> None:
        """SIGKILL every `lease -- CMD` and holder still running (their
        sessions must then end by themselves) and collect what the killed
        commands said."""
        for proc in [*self.commands, *self.holders.values()]:
            if proc.poll() is None:
                proc.kill()
        for proc in self.commands:
            proc.wait()
            assert proc.stderr is not None
            if proc.returncode not in (0, -signal.SIGKILL):
                self.check_error("lease -- CMD", proc.stderr.read().decode(errors="replace"))


def session_processes(root: Path) -> list[str]:
    """Live processes whose envelope names a bindspace under ``root``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            env = proc.environ()
        except psutil.Error:
            continue
        if env.get("TRACTOR_SESSION_ID") and env.get("XDG_RUNTIME_DIR", "").startswith(f"{root}/") and pid_alive(proc.pid):
            found.append(f"{proc.pid}: {' '.join(proc.info['cmdline'] or [])}")
    return found


def settle(leftovers: Callable[[], Sequence[object]], timeout: float, what: str) -> None:
    """Wait until ``leftovers()`` is empty; fail naming what is left."""
    left: list[object] = []

    def none_left() -> bool:
        left[:] = leftovers()
        return not left

    try:
        wait_for(none_left, timeout, what)
    except AssertionError:
        raise AssertionError(f"{what} left after {timeout} s: {left}") from None


def test_chaos_leaves_nothing_behind(runtime: Runtime, request: pytest.FixtureRequest) -> None:
    seconds: float = request.config.getoption("--chaos-seconds")
    seed: int | None = request.config.getoption("--chaos-seed")
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 32)
    chaos = Chaos(runtime, random.Random(seed))
    replay = f"replay with --chaos-seed {seed}"
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            chaos.act()
            try:
                chaos.check_invariants()
            except AssertionError as broken:
                raise AssertionError(f"{broken} ({replay})") from None
        chaos.kill_everything()
        assert not chaos.errors, f"a command failed badly ({replay}): {chaos.errors}"

        # Every session ends by itself: its bindspace goes, its processes
        # are reaped, its port is free.  The dice may have killed the last
        # daemon; as for any user, the next client starts one.
        done = runtime.cli("lease", "--", "true")
        assert done.returncode == 0, done.stderr
        settle(lambda: sorted(chaos.live_ids()), 2 * RECLAIM, f"live leases ({replay})")
        settle(runtime.bindspaces, RECLAIM, f"bindspaces ({replay})")
        settle(lambda: session_processes(runtime.root), RECLAIM, f"session processes ({replay})")
        busy = [port for port in sorted(chaos.ports) if not port_bindable(port, "127.0.0.1", (socket.SOCK_STREAM,))]
        assert busy == [], f"ports still bound ({replay}): {busy}"
    finally:
        stop_autostarted_daemon(runtime)
    print(f"chaos for {seconds} s ({replay}): {chaos.counts}")
