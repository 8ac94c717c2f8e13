"""pytest plugin: every test run, and every xdist worker, in its own session.

Inert until asked: ``--tractor-session``, ``tractor_session = true`` in the
ini file, or a test using one of the fixtures below.  Then the run takes a
lease (holder: the pytest process) and writes its envelope into
``os.environ`` so that every subprocess a test starts inherits it.  Under
``tractor-session lease -- pytest`` the inherited session is used as is.
With pytest-xdist each worker takes a lease of its own, recorded as a child
of the run's lease.

Names are prefixed ``tractor_session``/``--tractor-session`` so that they
never clash with tractor's own plugin (``--tpt-proto``, ``reg_addr``, ...),
whose ``--tpt-proto`` we follow when it is there.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# Nothing of ours is imported until a run is active: every pytest start
# (and every xdist worker) on a machine with this package installed loads
# this module.
if TYPE_CHECKING:
    from tractor_session.protocol import Transport
    from tractor_session.rtvars import RuntimeVars

_STATE = pytest.StashKey["_RunSession"]()
_LEAKS_KEY = "tractor_session_leaks"


@dataclass(frozen=True)
class SessionLease:
    """The session a test run (or xdist worker) runs in."""

    lease_id: str
    bindspace: Path
    transport: str
    registry_addr: tuple[str, int | str]
    env: dict[str, str]
    inherited: bool


@dataclass
class _RunSession:
    """Takes the lease on first use and gives everything back at the end."""

    config: pytest.Config
    lease: SessionLease | None = None
    owned: bool = False
    saved_env: dict[str, str | None] = field(default_factory=dict)
    worker_leaks: list[str] = field(default_factory=list)

    def ensure(self) -> SessionLease:
        if self.lease is None:
            self.lease = self._take()
        return self.lease

    def _take(self) -> SessionLease:
        from tractor_session.client import ClientError, connect

        inherited = _inherited_lease()
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        if inherited is not None and worker is None:
            return inherited
        parent = inherited.lease_id if inherited is not None else None
        try:
            with connect() as conn:
                granted = conn.lease(_transport(self.config), holder_pid=os.getpid(), parent=parent)
        except ClientError as err:
            raise pytest.UsageError(f"tractor-session: could not take a lease: {err}") from None
        self.owned = True
        env = granted.env
        for name, value in env.items():
            self.saved_env.setdefault(name, os.environ.get(name))
            os.environ[name] = value
        info = granted.lease
        return SessionLease(info.lease_id, Path(info.bindspace), info.transport, info.registry_addr, env, False)

    def leaks(self) -> list[str]:
        """What the session left behind: socket files and processes."""
        if self.lease is None:
            return []
        import psutil

        from tractor_session import procs

        found = [
            f"socket {path}" for path in _sockets_under(self.lease.bindspace)
        ]
        # Under `tractor-session lease -- make test`, say, pytest's own
        # ancestors carry the session too; they are not leftovers.
        ancestors = {p.pid for p in psutil.Process().parents()}
        found += [
            f"process {v.pid}: {v.cmdline[:200]}"
            for v in procs.session_processes(self.lease.lease_id)
            if v.pid not in ancestors
        ]
        return found

    def finish(self) -> None:
        from tractor_session.client import ClientError, connect

        for name, value in self.saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if self.owned and self.lease is not None:
            try:
                with connect(autostart=False) as conn:
                    conn.release(self.lease.lease_id)
            except ClientError:
                pass  # already ended (the daemon saw the holder die or restarted)
        self.lease = None


def _sockets_under(top: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            path = Path(dirpath, name)
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    found.append(path)
            except FileNotFoundError:
                continue
    return sorted(found)


def _inherited_lease() -> SessionLease | None:
    """The session this process was started in, if any."""
    from tractor_session import envelope
    if envelope._TRACTOR_RT_VARS_OSENV not in os.environ:
        return None
    try:
        rtvars = envelope.load_rtvars(os.environ)
    except envelope.EnvelopeError as err:
        raise pytest.UsageError(f"tractor-session: the inherited envelope is unusable: {err}") from None
    if rtvars._session_uuid is None or rtvars._bindspace is None or not rtvars._registry_addrs:
        return None
    return SessionLease(
        rtvars._session_uuid,
        Path(rtvars._bindspace),
        rtvars._enable_tpts[0] if rtvars._enable_tpts else "tcp",
        rtvars._registry_addrs[0],
        {k: os.environ[k] for k in envelope.SESSION_VARS if k in os.environ},
        True,
    )


def _transport(config: pytest.Config) -> Transport:
    """tractor's ``--tpt-proto`` when its plugin is loaded, else ours."""
    try:
        tractors = config.getoption("--tpt-proto")
    except ValueError:
        ours: Transport = config.getoption("tractor_session_transport")
        return ours
    # tractor's option is a list (nargs='+'); a lease has one transport.
    names = [tractors] if isinstance(tractors, str) else list(tractors or [])
    names = [str(n).strip("'\"") for n in names]
    if len(names) != 1 or names[0] not in ("tcp", "uds"):
        raise pytest.UsageError(
            f"tractor-session: --tpt-proto {' '.join(names)!r}: a session needs exactly one"
            " transport, tcp or uds"
        )
    return "tcp" if names[0] == "tcp" else "uds"


def _active(config: pytest.Config) -> bool:
    return bool(config.getoption("tractor_session") or config.getini("tractor_session"))


# -- hooks ------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tractor-session", "private tractor sessions per test run")
    group.addoption(
        "--tractor-session", action="store_true", dest="tractor_session",
        help="run the tests in a private tractor session (a lease from tractor-session)",
    )
    group.addoption(
        "--tractor-session-transport", choices=("tcp", "uds"), default="tcp",
        dest="tractor_session_transport",
        help="registry transport of the session, unless tractor's --tpt-proto is given (default: tcp)",
    )
    parser.addini("tractor_session", "run the tests in a private tractor session", type="bool", default=False)


def pytest_configure(config: pytest.Config) -> None:
    state = _RunSession(config)
    config.stash[_STATE] = state
    if _active(config):
        state.ensure()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """xdist workers hand their leak list to the controller."""
    workeroutput = getattr(session.config, "workeroutput", None)
    state = session.config.stash.get(_STATE, None)
    if workeroutput is not None and state is not None:
        workeroutput[_LEAKS_KEY] = state.leaks()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    state = node.config.stash.get(_STATE, None)
    if state is not None:
        state.worker_leaks += getattr(node, "workeroutput", {}).get(_LEAKS_KEY, [])


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is None or (state.lease is None and not state.worker_leaks):
        return
    leaks = state.leaks() + state.worker_leaks
    if not leaks:
        terminalreporter.write_line("tractor-session: the run left nothing behind in its session")
        return
    terminalreporter.section("tractor-session: left behind in the session")
    for line in leaks:
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"{len(leaks)} leftover(s); the session's end cleans them up")


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is not None:
        state.finish()


# -- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="session")
def tractor_session_lease(pytestconfig: pytest.Config) -> SessionLease:
    """The run's (or this xdist worker's) session: id, bindspace, registry
    address, envelope.  Taken on first use if the run is not active."""
    return pytestconfig.stash[_STATE].ensure()


@pytest.fixture(scope="session")
def tractor_session_rtvars(tractor_session_lease: SessionLease) -> RuntimeVars:
    """The envelope as a :class:`~tractor_session.envelope.RuntimeVars`;
    ``tractor.open_root_actor(**tractor_session_rtvars.as_kwargs())``."""
    from tractor_session import envelope
    return envelope.load_rtvars(tractor_session_lease.env)


@pytest.fixture(scope="session")
def tractor_session_reg_addr(tractor_session_lease: SessionLease) -> tuple[str, int | str]:
    """The registry address for the session's transport."""
    return tractor_session_lease.registry_addr


@pytest.fixture
def tractor_session_env(tractor_session_lease: SessionLease) -> Iterator[dict[str, str]]:
    """A fresh copy of ``os.environ`` with the envelope, for tests that build
    a subprocess environment by hand.  Function-scoped: each test may
    change its copy freely."""
    yield {**os.environ, **tractor_session_lease.env}
