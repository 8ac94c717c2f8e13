'''
The envelope's reader: tractor runtime vars carried in one variable.

A session hands its holder the variable ``_TRACTOR_RT_VARS`` whose value is
``str(d)`` of a dict of plain literals (str, int, float, bool, None, list,
tuple, dict), read back with ``ast.literal_eval``. Every process started
inside the session inherits it, so a script spawned by a test finds the
session's registry without any command-line plumbing (the lift plan's
"Phase 1")::

    import os
    import tractor
    from tractor_session.envelope import load_rtvars

    rtvars = load_rtvars(os.environ)
    async with tractor.open_root_actor(**rtvars.as_kwargs()):
        ...

Why ``str(dict)`` + ``literal_eval`` and not JSON: tractor's canonical
address form is a tuple (``('127.0.0.1', 24011)``,
``('<dir>', 'registry@1616.sock')``) and JSON turns tuples into lists. The
text also stays greppable in ``/proc/<pid>/environ``.

The value is untrusted input (any process can set it), so the loader never
evaluates code: it parses with ``ast.parse``, accepts only literal nodes of
the types above, bounds size and nesting before ``literal_eval`` runs, and
checks the type of every known key. Every failure is an `EnvelopeError`.

This module imports msgspec, so light callers reach it through
:mod:`tractor_session.envelope`, which names every variable and re-exports
this API on first use. It imports neither trio nor psutil and starts
nothing.
'''
from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import msgspec

from tractor_session.envelope import _TRACTOR_RT_VARS_OSENV, NO_REAP_KEY
from tractor_session.literals import (
    MAX_DEPTH,
    MAX_ENVELOPE_BYTES,
    EnvelopeError,
    check_literal,
    parse,
    short,
)

if TYPE_CHECKING:
    import psutil

__all__ = [
    '_TRACTOR_RT_VARS_OSENV',
    'NO_REAP_KEY',
    'MAX_ENVELOPE_BYTES',
    'MAX_DEPTH',
    'EnvelopeError',
    'RuntimeVars',
    'dump_rtvars',
    'load_rtvars',
    'get_rtvars',
    'update_rtvars',
]

_TRANSPORTS: frozenset[str] = frozenset({'tcp', 'uds'})
_UUID_RE: re.Pattern[str] = re.compile(
    r'[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}'
)
# attribute holding unknown keys; reserved, so it is never an envelope key
_EXTRA: str = 'extra'


# -- value checks, one per known key --------------------------------------

def _check_str(value: Any) -> str | None:
    '''Why a host, directory or filename string is unusable, or None.'''
    if type(value) is not str:
        return f'{short(value)} is not a str'
    if not value:
        return 'empty string'
    if '\0' in value:
        return f'NUL in {short(value)}'
    return None


def _check_port_or_file(value: Any) -> str | None:
    '''Why the 2nd half of an address (TCP port or UDS filename) is
    unusable, or None.'''
    if type(value) is int:  # not bool
        if 0 <= value <= 65535:
            return None
        return f'port {value} out of range 0..65535'
    if type(value) is str:
        return _check_str(value)
    return f'{short(value)} is neither a port (int) nor a filename (str)'


def _bool(key: str, value: Any) -> bool:
    # 0/1 are refused: a writer that produces them has another bug
    if type(value) is not bool:
        raise EnvelopeError(f'expected a bool, got {short(value)}', key)
    return value


def _addrs(key: str, value: Any) -> list[tuple[str, str | int]]:
    expected: str = (
        f'expected a list of 2-tuples (host, port|filename), '
        f'got {short(value)}'
    )
    if type(value) not in (list, tuple):
        raise EnvelopeError(expected, key)
    for addr in value:
        if type(addr) is not tuple or len(addr) != 2:
            raise EnvelopeError(expected, key)
        why: str | None = (
            _check_str(addr[0]) or _check_port_or_file(addr[1])
        )
        if why:
            raise EnvelopeError(f'{expected}: {why}', key)
    return list(value)


def _tpts(key: str, value: Any) -> list[str]:
    if type(value) not in (list, tuple) or not all(
        type(tpt) is str and tpt in _TRANSPORTS for tpt in value
    ):
        raise EnvelopeError(
            f"expected a list of 'tcp'|'uds', got {short(value)}", key
        )
    return list(value)


def _mailbox(key: str, value: Any) -> tuple[str | None, str | int | None]:
    expected: str = (
        f'expected a 2-tuple (host|None, port|filename|None), '
        f'got {short(value)}'
    )
    if type(value) is not tuple or len(value) != 2:
        raise EnvelopeError(expected, key)
    host, port = value
    why: str | None = None if host is None else _check_str(host)
    if why is None and port is not None:
        why = _check_port_or_file(port)
    if why:
        raise EnvelopeError(f'{expected}: {why}', key)
    return value


def _session_uuid(key: str, value: Any) -> str | None:
    if value is not None and (
        type(value) is not str or not _UUID_RE.fullmatch(value)
    ):
        raise EnvelopeError(
            f'expected None or a lowercase uuid, got {short(value)}', key
        )
    return value


def _bindspace(key: str, value: Any) -> str | None:
    # `..` is refused too: the bindspace is a directory that gets created
    # and removed, it must name where it really is
    if value is not None and (
        type(value) is not str
        or not value.startswith('/')
        or '\0' in value
        or '..' in value.split('/')
    ):
        raise EnvelopeError(
            f'expected None or an absolute path without NUL or "..", '
            f'got {short(value)}',
            key,
        )
    return value


_VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    '_is_root': _bool,
    '_root_mailbox': _mailbox,
    '_root_addrs': _addrs,
    '_enable_tpts': _tpts,
    '_registry_addrs': _addrs,
    '_debug_mode': _bool,
    'repl_fixture': _bool,
    'use_greenback': _bool,
    'use_stackscope': _bool,
    '_is_infected_aio': _bool,
    '_session_uuid': _session_uuid,
    '_bindspace': _bindspace,
}


class RuntimeVars(msgspec.Struct, kw_only=True):
    '''
    The envelope's content: tractor's ``tractor.runtime._state.RuntimeVars``
    fields (same names, types and defaults) plus our session keys.

    Construction validates and normalises (address and transport lists
    given as tuples become lists), raising `EnvelopeError`.

    Keys this version does not know (a newer writer's) are kept in
    ``extra`` and written back flat by `to_dict`, so a round trip through
    an older reader loses nothing. ``extra`` itself is not an envelope key:
    an input key literally named ``'extra'`` is an unknown key like any
    other and lands inside the ``extra`` dict.
    '''
    _is_root: bool = False
    _root_mailbox: tuple[str | None, str | int | None] = (None, None)
    _root_addrs: list[tuple[str, str | int]] = msgspec.field(
        default_factory=list
    )
    _enable_tpts: list[str] = msgspec.field(default_factory=lambda: ['tcp'])
    _registry_addrs: list[tuple[str, str | int]] = msgspec.field(
        default_factory=list
    )
    _debug_mode: bool = False
    repl_fixture: bool = False
    use_greenback: bool = False
    use_stackscope: bool = False
    _is_infected_aio: bool = False

    # ours, for the lift plan's Phase 3
    _session_uuid: str | None = None
    _bindspace: str | None = None

    extra: dict[str, Any] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, validate in _VALIDATORS.items():
            setattr(self, key, validate(key, getattr(self, key)))
        if type(self.extra) is not dict:
            raise EnvelopeError(
                f'{_EXTRA} must be a dict, got {short(self.extra)}'
            )
        for key, value in self.extra.items():
            if type(key) is not str:
                raise EnvelopeError(f'keys must be str, got {short(key)}')
            if key in _VALIDATORS:
                raise EnvelopeError(
                    f'known key inside {_EXTRA!r}, set the field', key
                )
            check_literal(value, key)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RuntimeVars:
        '''Validate a flat envelope dict: known keys become fields,
        the rest goes to ``extra``.'''
        if not isinstance(d, Mapping):
            raise EnvelopeError(
                f'top level must be a dict, got {type(d).__name__}'
            )
        known: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in d.items():
            (known if key in _VALIDATORS else extra)[key] = value
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        '''The flat envelope dict: known keys in field order, then the
        unknown ones. Address tuples stay tuples. Containers are shared
        with the struct, not copied.'''
        d: dict[str, Any] = {key: getattr(self, key) for key in _VALIDATORS}
        d.update(self.extra)
        return d

    def as_kwargs(self) -> dict[str, Any]:
        '''
        Exactly the keyword arguments `tractor.open_root_actor()` (and
        `open_nursery()`) accept. ``_is_root``, ``_root_mailbox``,
        ``_root_addrs`` and ``_is_infected_aio`` are left out: tractor
        computes them. An empty ``registry_addrs`` makes tractor use its
        default registry.
        '''
        return {
            'registry_addrs': list(self._registry_addrs),
            'enable_transports': list(self._enable_tpts),
            'debug_mode': self._debug_mode,
            'maybe_enable_greenback': self.use_greenback,
            'enable_stack_on_sig': self.use_stackscope,
        }


# -- the lift plan's API -----------------------------------------------------

def dump_rtvars(rtvars: RuntimeVars | Mapping[str, Any]) -> tuple[str, str]:
    '''
    Encode as ``(name, value)`` ready for an environment.

    A dict is validated exactly as `load_rtvars` would validate it, and any
    input is re-validated (a struct's fields may have been assigned since
    construction), so what is written can always be read back: the value
    is the canonical form, every known key present (missing ones filled
    with defaults), and ``load_rtvars({name: value}).to_dict()`` equals
    the validated dict, tuples included.
    '''
    d: Mapping[str, Any] = (
        rtvars.to_dict() if isinstance(rtvars, RuntimeVars) else rtvars
    )
    canonical: dict[str, Any] = RuntimeVars.from_dict(d).to_dict()
    try:
        value: str = str(canonical)
    except ValueError as err:
        # an int beyond `sys.get_int_max_str_digits()`
        raise EnvelopeError(f'cannot encode: {err}') from None
    if len(value.encode('utf-8', 'surrogatepass')) > MAX_ENVELOPE_BYTES:
        raise EnvelopeError(f'value larger than {MAX_ENVELOPE_BYTES} bytes')
    return _TRACTOR_RT_VARS_OSENV, value


def load_rtvars(env: Mapping[str, str]) -> RuntimeVars:
    '''
    Decode and validate the envelope in ``env`` (an environment mapping,
    usually `os.environ`).

    Raises `EnvelopeError` for every failure, including when the variable
    is not set at all: check ``_TRACTOR_RT_VARS_OSENV in env`` first when
    running outside a session is normal.
    '''
    try:
        value: str = env[_TRACTOR_RT_VARS_OSENV]
    except KeyError:
        raise EnvelopeError('not set') from None
    return RuntimeVars.from_dict(parse(value))


def get_rtvars(proc: psutil.Process | None = None) -> RuntimeVars:
    '''
    The envelope of this process (`os.environ`), or of ``proc``.

    For another process this is the environment it was exec'd with:
    changes it made to its own `os.environ` later are invisible.
    `psutil.NoSuchProcess` (incl. `ZombieProcess`) and
    `psutil.AccessDenied` propagate unchanged: they say something about the
    process, not about its envelope.
    '''
    env: Mapping[str, str] = os.environ if proc is None else proc.environ()
    return load_rtvars(env)


def update_rtvars(
    rtvars: RuntimeVars | Mapping[str, Any] | None = None,
    update_osenv: bool | MutableMapping[str, str] = True,
) -> tuple[str, str]:
    '''
    Change the envelope and return the new ``(name, value)``.

    ``update_osenv`` picks the environment: `os.environ` when True or
    False (False: read it, write nowhere), or the given mapping, which is
    then both read from and written to.

    ``rtvars`` is either a struct, which replaces the envelope, or a dict
    of key updates applied on top of the current envelope (defaults when
    the variable is not set). An invalid update or an invalid current
    envelope raises `EnvelopeError` and leaves the environment untouched.
    '''
    env: MutableMapping[str, str] = (
        os.environ if isinstance(update_osenv, bool) else update_osenv
    )
    if isinstance(rtvars, RuntimeVars):
        new: RuntimeVars = rtvars
    else:
        current: RuntimeVars = (
            load_rtvars(env) if _TRACTOR_RT_VARS_OSENV in env
            else RuntimeVars()
        )
        new = RuntimeVars.from_dict({**current.to_dict(), **(rtvars or {})})
    name, value = dump_rtvars(new)
    if update_osenv is not False:
        env[name] = value
    return name, value
