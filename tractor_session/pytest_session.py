"""An active pytest run's session: what the plugin does once asked.

:mod:`tractor_session.pytest_plugin` is the inert entry point; it imports
this module only when a run is active (``--tractor-session``, the ini
setting, or a fixture), and registers :class:`RunSession` as a plugin.

**How the pytest process gets inside its session.**  tractor computes its
socket directory once, when ``tractor`` is imported, from
``XDG_RUNTIME_DIR``; by the time any plugin hook runs, tractor's own pytest
plugin (``-p tractor._testing.pytest``) or a conftest may have imported
it.  Writing the envelope into ``os.environ`` then would leave the root
actor in pytest binding in the shared directory while the subactors it
spawns bind in the session: one run split across two bindspaces.  So an
active run that is not yet inside a session *re-executes itself inside
one*, as early as a plugin can act (``pytest_load_initial_conftests``,
before conftests load): the process becomes ``tractor-session lease --
<the same pytest command>``.  It keeps its pid, exit status and signals,
so whoever started pytest sees no difference; the new pytest starts with
the envelope in its environment, whatever imports tractor and in which
order.  The ``lease`` process is the holder and the session's subreaper:
if pytest itself (with the root actor in it) is SIGKILLed, the subactors
it orphans come back to ``lease`` and are reaped with the session.  The
same holds for ``--tractor-session-net private``: ``lease`` makes the
network before pytest starts.  Under ``tractor-session lease -- pytest``
the inherited session is used as is.

**xdist.**  Each worker gets a session of its own (and, with a private
network, a network of its own), a child of the run's: the controller
starts each local worker through ``tractor-session lease --parent <run>``,
so a worker too starts inside its session.  Workers talk to the
controller over pipes, not the network.

Names are prefixed ``tractor_session``/``--tractor-session`` so that they
never clash with tractor's own plugin (``--tpt-proto``, ``reg_addr``, ...),
whose ``--tpt-proto`` we follow when it is there.
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tractor_session.protocol import Net, Transport

_LEAKS_KEY = "tractor_session_leaks"

_FOR_THIS_RUN_ENV = "_TRACTOR_SESSION_FOR_THIS_RUN"
"""Set for a pytest started inside a session leased for it (the
re-executed run, an xdist worker): its session is its own, not inherited.
Taken out of the environment at once, so the tests' subprocesses never
see it."""
_LEASED_FOR_THIS_RUN = os.environ.pop(_FOR_THIS_RUN_ENV, None) is not None


@dataclass(frozen=True)
class SessionLease:
    """The session a test run (or xdist worker) runs in."""

    lease_id: str
    bindspace: Path
    transport: str
    registry_addr: tuple[str, int | str]
    env: dict[str, str]
    inherited: bool
    net: str = "host"


@dataclass
class RunSession:
    """The run's session, and the plugin that reports on it: inherited from
    the environment this process was started with, or (activated by a
    fixture only, too late to re-execute) leased by this process on first
    use and given back at the end."""

    config: pytest.Config
    lease: SessionLease | None = None
    owned: bool = False
    saved_env: dict[str, str | None] = field(default_factory=dict)
    worker_leaks: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def ensure(self) -> SessionLease:
        if self.lease is None:
            self.lease = _inherited_lease() or self._take()
        return self.lease

    def _take(self) -> SessionLease:
        from tractor_session.client import ClientError, connect

        try:
            with connect() as conn:
                granted = conn.lease(_transport(self.config), holder_pid=os.getpid())
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
        """What the session left behind: socket files, and processes (this
        process's descendants among them, whatever their environment)."""
        if self.lease is None:
            return []
        import psutil

        from tractor_session import procs

        found = [f"socket {path}" for path in _sockets_under(self.lease.bindspace)]
        # pytest's own ancestors carry the session too (the `lease` that
        # runs it, `make test` under `tractor-session lease`, ...); they
        # are not leftovers.
        ancestors = {p.pid for p in psutil.Process().parents()}
        target = procs.Target(roots=frozenset([os.getpid()]))
        found += [
            f"process {v.pid}: {v.cmdline[:200]}"
            for v in procs.session_processes(self.lease.lease_id, target)
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

    # -- hooks (this object is registered as a plugin) ----------------------

    def start(self) -> None:
        """An active run: take (or take over) its session now, and track
        what each test leaves in it."""
        from tractor_session import pytest_leaks

        lease = self.ensure()
        if lease.inherited:
            _check_inherited(self, lease)
        self.config.pluginmanager.register(pytest_leaks.tracker(self.config, lease.bindspace), "tractor_session.leaks")

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_setupnodes(self, config: pytest.Config, specs: list[Any]) -> None:
        """Start each local worker inside a session of its own, a child of
        the run's, so that it too is inside it before anything imports
        tractor."""
        if self.lease is None:
            return
        import shlex

        import execnet

        wrapper = _lease_command(_transport(config), _net(config), parent=self.lease.lease_id)
        for i, spec in enumerate(specs):
            if spec.popen and not spec.python:
                python = " ".join(shlex.quote(arg) for arg in [*wrapper, sys.executable])
                name = f"//id={spec.id}" if spec.id else ""
                specs[i] = execnet.XSpec(f"{spec}{name}//python={python}//env:{_FOR_THIS_RUN_ENV}=1")

    def pytest_report_header(self) -> list[str]:
        if self.lease is None:
            return []
        from tractor_session.envelope import show_registry
        from tractor_session.paths import short_name

        lease = self.lease
        registry = show_registry(lease.transport, lease.registry_addr)
        return [
            f"tractor-session: session {short_name(lease.lease_id)} ({lease.transport}, {lease.net} network),"
            f" registry {registry}, bindspace {lease.bindspace}",
            *(f"tractor-session: warning: {line}" for line in self.warnings),
        ]

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """xdist workers hand their leak list to the controller."""
        workeroutput = getattr(session.config, "workeroutput", None)
        if workeroutput is not None:
            workeroutput[_LEAKS_KEY] = self.leaks()

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object) -> None:
        self.worker_leaks += getattr(node, "workeroutput", {}).get(_LEAKS_KEY, [])

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.lease is None and not self.worker_leaks:
            return
        leaks = self.leaks() + self.worker_leaks
        if not leaks:
            terminalreporter.write_line("tractor-session: the run left nothing behind in its session")
            return
        terminalreporter.section("tractor-session: left behind in the session")
        for line in leaks:
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"{len(leaks)} leftover(s); the session's end cleans them up")

    def pytest_unconfigure(self) -> None:
        self.finish()


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
        not _LEASED_FOR_THIS_RUN,
        os.environ.get(envelope.SESSION_NET_ENV, "host"),
    )


def _option(config: pytest.Config, dest: str, default: Any = None) -> Any:
    """An option's value, from the earliest hook on (``config.option`` is
    filled in only after ``pytest_load_initial_conftests``)."""
    return getattr(config.known_args_namespace, dest, default)


def _tpt_proto_arguments(config: pytest.Config) -> list[str] | None:
    """The values given to tractor's ``--tpt-proto`` on the command line (or
    in ``PYTEST_ADDOPTS``), read from the arguments themselves: when the
    run re-executes itself, tractor's plugin may not be loaded yet (a
    conftest's ``pytest_plugins`` loads it later)."""
    import shlex

    args = [*shlex.split(os.environ.get("PYTEST_ADDOPTS", "")), *config.invocation_params.args]
    found: list[str] | None = None
    for i, arg in enumerate(args):
        if arg.startswith("--tpt-proto="):
            found = [arg.partition("=")[2]]
        elif arg == "--tpt-proto":
            found = []
            for value in args[i + 1:]:
                if value.startswith("-"):
                    break
                found.append(value)
    return found


def _transport(config: pytest.Config) -> Transport:
    """tractor's ``--tpt-proto`` when it is given, else ours."""
    tractors = _option(config, "tpt_protos")
    if (given := _tpt_proto_arguments(config)) is not None:
        tractors = given
    if tractors is None:
        ours: Transport = _option(config, "tractor_session_transport", "tcp")
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


def _net(config: pytest.Config) -> Net:
    net: Net = _option(config, "tractor_session_net") or config.getini("tractor_session_net") or "host"
    if net not in ("host", "private"):
        raise pytest.UsageError(f"tractor-session: tractor_session_net = {net!r}: expected host or private")
    return net


def _asked_for(config: pytest.Config, *flags: str) -> bool:
    """Whether the command line names one of ``flags`` (not a default)."""
    return any(arg.split("=")[0] in flags for arg in config.invocation_params.args)


def _lease_command(transport: Transport, net: Net, parent: str | None = None) -> list[str]:
    command = [sys.executable, "-m", "tractor_session", "lease", "--tpt-proto", transport, "--net", net]
    if parent is not None:
        command += ["--parent", parent]
    return [*command, "--"]


def _check_inherited(state: RunSession, lease: SessionLease) -> None:
    """Say so when the session inherited differs from what was asked."""
    from tractor_session.paths import short_name

    config = state.config
    transport = _transport(config)
    if lease.transport != transport and _asked_for(config, "--tpt-proto", "--tractor-session-transport"):
        state.warnings.append(
            f"this run asked for transport {transport} but runs in the inherited {lease.transport}"
            f" session {short_name(lease.lease_id)} (from `tractor-session lease --tpt-proto {lease.transport}`);"
            f" the session's {lease.transport} is used"
        )
    if _net(config) == "private" and lease.net != "private":
        state.warnings.append(
            f"this run asked for a private network but runs in the inherited session"
            f" {short_name(lease.lease_id)}, which shares the host's network; lease it with"
            " `tractor-session lease --net private -- pytest ...` instead"
        )
    for line in state.warnings:
        print(f"tractor-session: warning: {line}", file=sys.stderr)


def activate(config: pytest.Config) -> RunSession:
    """The run's :class:`RunSession`, registered as a plugin on first use."""
    if (state := config.pluginmanager.get_plugin(_PLUGIN_NAME)) is None:
        state = RunSession(config)
        config.pluginmanager.register(state, _PLUGIN_NAME)
    assert isinstance(state, RunSession)
    return state


_PLUGIN_NAME = "tractor_session.run"


def reexec_inside_session(early_config: pytest.Config) -> None:
    """Unless this run already is inside a session, become ``tractor-session
    lease -- <this same pytest command>`` (see the module docstring)."""
    if _inherited_lease() is not None or os.environ.get("PYTEST_XDIST_WORKER"):
        # A worker started outside our wrapper leases in-process instead.
        return
    command = [*_lease_command(_transport(early_config), _net(early_config)), sys.executable, *sys.orig_argv[1:]]
    # pytest captures fds 1 and 2 from this hook on: give them back, or the
    # re-executed run would write into a capture file nobody reads.
    if (capture := early_config.pluginmanager.getplugin("capturemanager")) is not None:
        capture.stop_global_capturing()
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ[_FOR_THIS_RUN_ENV] = "1"
    os.execv(command[0], command)
