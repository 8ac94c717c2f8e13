"""pytest plugin: every test run, and every xdist worker, in its own session.

Inert until asked: ``--tractor-session``, ``tractor_session = true`` in the
ini file, or a test using one of the fixtures below.  This module is the
entry point every pytest start loads (every xdist worker too), so it stays
this small and imports nothing of ours: an active run's machinery lives in
:mod:`tractor_session.pytest_session` (how pytest itself gets inside its
session, xdist workers, the leak report), imported once a run is active.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tractor_session.pytest_session import SessionLease
    from tractor_session.rtvars import RuntimeVars


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
    group.addoption(
        "--tractor-session-net", choices=("host", "private"), dest="tractor_session_net",
        help="private: run the tests (and each xdist worker) in a network of their own, where"
        " tractor's default registry 127.0.0.1:1616 is the session's alone; services on the"
        " host's loopback are then out of reach (default: host, or the ini setting)",
    )
    group.addoption(
        "--tractor-session-leaks", choices=("report", "reap", "fail"), dest="tractor_session_leaks",
        help="what to do with what a test leaves behind (processes it started, socket files nobody"
        " listens on): report it, reap it (the default), or reap it and make the test error in teardown",
    )
    group.addoption(
        "--tractor-session-leaks-json", metavar="PATH", dest="tractor_session_leaks_json",
        help="also write the leftovers, by test, as JSON to PATH (for CI)",
    )
    parser.addini("tractor_session", "run the tests in a private tractor session", type="bool", default=False)
    parser.addini("tractor_session_net", "the session's network: host or private", default="host")


def _active(config: pytest.Config) -> bool:
    # known_args_namespace: config.option is filled in only after
    # pytest_load_initial_conftests.
    return bool(getattr(config.known_args_namespace, "tractor_session", False) or config.getini("tractor_session"))


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """As early as a plugin can act, before conftests (or anything else)
    import tractor: an active run outside any session re-executes itself
    inside one."""
    if _active(early_config):
        from tractor_session import pytest_session

        pytest_session.reexec_inside_session(early_config)


def pytest_configure(config: pytest.Config) -> None:
    if _active(config):
        from tractor_session import pytest_session

        pytest_session.activate(config).start()


@pytest.fixture(scope="session")
def tractor_session_lease(pytestconfig: pytest.Config) -> SessionLease:
    """The run's (or this xdist worker's) session: id, bindspace, registry
    address, envelope.  Taken on first use if the run is not active."""
    from tractor_session import pytest_session

    return pytest_session.activate(pytestconfig).ensure()


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
    import os

    yield {**os.environ, **tractor_session_lease.env}
