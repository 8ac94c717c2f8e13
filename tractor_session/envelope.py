"""The envelope: the environment a session hands to everything it runs.

Every variable a session sets is named here, and :func:`session_env` is
the one place that writes them.  The core is ``_TRACTOR_RT_VARS``, tractor's
runtime vars as ``str(dict)`` (see :mod:`tractor_session.rtvars` for why and
for the validating reader); around it:

- ``XDG_RUNTIME_DIR``: the bindspace, so that an *unmodified* tractor,
  which computes its socket directory from this variable when it is
  imported, binds every socket inside the session;
- ``TRACTOR_SESSION_SOCKET`` and ``TRACTOR_SESSION_ROOT``: where the daemon
  is, so that a ``tractor-session`` call inside the session reaches the same
  daemon although ``XDG_RUNTIME_DIR`` now points elsewhere;
- ``TRACTOR_SESSION_ID``: the session id, for shells and scripts;
- ``TRACTOR_SESSION_NET``: ``host``, or ``private`` when the session runs
  in a network of its own.

This module is imported on the hot path of every test run (the client and
the pytest plugin name these variables), so it imports only the standard
library.  The reader of the lift plan's API (``load_rtvars``,
``RuntimeVars``, ...) is re-exported from :mod:`tractor_session.rtvars` on
first use, which is when msgspec gets imported.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not ``typing.TYPE_CHECKING``: typing costs ms to import
if TYPE_CHECKING:
    from typing import Any

    from tractor_session.protocol import Net, Transport
    from tractor_session.rtvars import MAX_DEPTH as MAX_DEPTH
    from tractor_session.rtvars import MAX_ENVELOPE_BYTES as MAX_ENVELOPE_BYTES
    from tractor_session.rtvars import EnvelopeError as EnvelopeError
    from tractor_session.rtvars import RuntimeVars as RuntimeVars
    from tractor_session.rtvars import dump_rtvars as dump_rtvars
    from tractor_session.rtvars import get_rtvars as get_rtvars
    from tractor_session.rtvars import load_rtvars as load_rtvars
    from tractor_session.rtvars import update_rtvars as update_rtvars

_TRACTOR_RT_VARS_OSENV = "_TRACTOR_RT_VARS"
"""tractor's runtime vars, ``str(dict)``; the lift plan's name."""

XDG_ENV = "XDG_RUNTIME_DIR"
SOCKET_ENV = "TRACTOR_SESSION_SOCKET"
ROOT_ENV = "TRACTOR_SESSION_ROOT"
"""Also read outside sessions: it overrides the runtime root."""
SESSION_ID_ENV = "TRACTOR_SESSION_ID"
SESSION_NET_ENV = "TRACTOR_SESSION_NET"
SUBREAPER_ENV = "TRACTOR_SESSION_SUBREAPER"
"""Set by ``lease -- CMD`` for CMD: its own pid, where the session's
orphaned processes land (it is their subreaper)."""
SCOPE_ENV = "TRACTOR_SESSION_SCOPE"
"""Set by the pytest plugin during each test: the test's node id, which
everything the test starts inherits."""

SESSION_VARS = (
    _TRACTOR_RT_VARS_OSENV, XDG_ENV, SOCKET_ENV, ROOT_ENV, SESSION_ID_ENV, SESSION_NET_ENV, SUBREAPER_ENV, SCOPE_ENV,
)
"""Every variable a session may set."""

NO_REAP_KEY = "_tractor_session_no_reap"
"""Ours, in the rt vars of sessions leased with ``--no-reap`` only: their
leftover processes belong to the user and garbage collection spares them
too.  Readers keep it as an unknown key, so tractor never sees it."""

TRACTOR_DEFAULT_REGISTRY = ("127.0.0.1", 1616)
"""tractor's default TCP registry; a session with a private network uses
it, as the address is then the session's alone."""

UDS_REGISTRY_NAME = "registry@1616.sock"
"""tractor's default registry socket name; a uds session's registrar
binds it inside the session's ``tractor/`` directory."""

TRACTOR_DEFAULTS: dict[str, object] = {
    "_is_root": False,
    "_root_mailbox": (None, None),
    "_root_addrs": [],
    "_enable_tpts": ["tcp"],
    "_registry_addrs": [],
    "_debug_mode": False,
    "repl_fixture": False,
    "use_greenback": False,
    "use_stackscope": False,
    "_is_infected_aio": False,
}
"""tractor's ``RuntimeVars`` defaults, in its field order (a test checks
that :class:`~tractor_session.rtvars.RuntimeVars` agrees)."""


def registry_addr(transport: Transport, bindspace: str, port: int | None) -> tuple[str, int | str]:
    """A session's registry address in tractor's canonical form: a tcp
    session without a port of its own (a private network) has tractor's
    default."""
    if transport == "uds":
        return (f"{bindspace}/tractor", UDS_REGISTRY_NAME)
    if port is None:
        return TRACTOR_DEFAULT_REGISTRY
    return ("127.0.0.1", port)


def show_registry(transport: str, addr: tuple[str, int | str]) -> str:
    """A registry address as people write it: ``host:port`` or ``dir/file``."""
    return f"{addr[0]}:{addr[1]}" if transport == "tcp" else f"{addr[0]}/{addr[1]}"


def session_env(
    lease_id: str,
    bindspace: str,
    transport: Transport,
    port: int | None,
    *,
    control_socket: str,
    root: str,
    reap: bool = True,
    set_xdg: bool = True,
    net: Net = "host",
) -> dict[str, str]:
    """The envelope of one session: every variable, in one place.

    Built from the daemon's own values, whose types are right by
    construction, so the validating reader (tens of microseconds a lease)
    is skipped: a copy of the defaults, updated, is the same ``str(dict)``
    the reader reads back.
    """
    rtvars: dict[str, object] = dict(TRACTOR_DEFAULTS)
    rtvars.update(
        _enable_tpts=[transport],
        _registry_addrs=[registry_addr(transport, bindspace, port)],
        _session_uuid=lease_id,
        _bindspace=bindspace,
    )
    if not reap:
        rtvars[NO_REAP_KEY] = True
    env = {
        _TRACTOR_RT_VARS_OSENV: str(rtvars),
        SOCKET_ENV: control_socket,
        ROOT_ENV: root,
        SESSION_ID_ENV: lease_id,
        SESSION_NET_ENV: net,
    }
    if set_xdg:
        env[XDG_ENV] = bindspace
    return env


_READER = frozenset({
    "MAX_DEPTH", "MAX_ENVELOPE_BYTES", "EnvelopeError", "RuntimeVars",
    "dump_rtvars", "get_rtvars", "load_rtvars", "update_rtvars",
})


def __getattr__(name: str) -> Any:
    """The reader's names, imported on first use (PEP 562)."""
    if name in _READER:
        from tractor_session import rtvars

        return getattr(rtvars, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
