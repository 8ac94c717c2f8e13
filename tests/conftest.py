"""Shared test infrastructure: a private runtime root per test, real daemon
processes, and deadline-bounded waiting (never a bare sleep)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tractor_session import paths

DEADLINE = 15.0


def wait_for(condition: Callable[[], object], timeout: float = DEADLINE, what: str = "condition") -> object:
    """Poll ``condition`` until it returns something truthy, or fail."""
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


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, ignoring the gone."""
    try:
        proc = psutil.Process(pid)
        family = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return
    for p in family:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(family, timeout=5)


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass
class Runtime:
    """A private runtime root (short enough for AF_UNIX paths) and the
    environment that points every client and daemon at it."""

    base: Path
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.base / "tractor"

    @property
    def control(self) -> Path:
        return Path(paths.control_dir(self.root))

    @property
    def socket(self) -> Path:
        return self.control / "control.sock"

    def bindspaces(self) -> list[Path]:
        if not self.root.exists():
            return []
        return sorted(p for p in self.root.iterdir() if len(p.name) == 12)

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
        """Run ``tractor-session ARGS`` to completion."""
        return subprocess.run(
            [sys.executable, "-m", "tractor_session", *args],
            env=env or self.env, capture_output=True, text=True, timeout=timeout, **kw,  # type: ignore[arg-type]
        )

    def popen(self, argv: list[str], env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen[bytes]:
        """Start a process that is killed (with its descendants) at teardown."""
        proc = subprocess.Popen(argv, env=env or self.env, **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def start_daemon(self, *args: str) -> subprocess.Popen[bytes]:
        """Start ``serve`` and return once it accepts connections."""
        read_fd, write_fd = os.pipe()
        proc = self.popen(
            [sys.executable, "-m", "tractor_session", "serve", "--root", str(self.root),
             "--ready-fd", str(write_fd), *args],
            pass_fds=(write_fd,), stderr=subprocess.PIPE,
        )
        os.close(write_fd)
        try:
            with os.fdopen(read_fd, "rb") as ready:
                if not ready.read(6):
                    proc.wait(timeout=DEADLINE)
                    assert proc.stderr is not None
                    raise AssertionError(f"daemon did not start: {proc.stderr.read().decode()}")
        except BaseException:
            proc.kill()
            raise
        return proc

    def daemon_pid(self) -> int | None:
        try:
            text = (self.control / "daemon.lock").read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() and pid_alive(int(text)) else None

    def cleanup(self) -> None:
        for proc in self.procs:
            kill_tree(proc.pid)
            proc.wait()
        if (pid := self.daemon_pid()) is not None:
            kill_tree(pid)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    # /tmp, not pytest's deeper tmp_path: bindspace socket paths must fit
    # AF_UNIX's 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="ts-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRACTOR_SESSION", "_TRACTOR"))}
    env[paths.ROOT_ENV] = str(base / "tractor")
    env["PYTHONUNBUFFERED"] = "1"
    for name in (paths.SOCKET_ENV, "_TRACTOR_RT_VARS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(paths.ROOT_ENV, env[paths.ROOT_ENV])
    rt = Runtime(base, env)
    try:
        yield rt
    finally:
        rt.cleanup()


@pytest.fixture
def daemon(runtime: Runtime) -> subprocess.Popen[bytes]:
    return runtime.start_daemon()
