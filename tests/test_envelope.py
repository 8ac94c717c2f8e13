'''
Tests for `tractor_session.envelope`: exact round trips, the tractor-facing
surface, and every hostile value we can think of being refused with an
`EnvelopeError` that says what is wrong.
'''
from __future__ import annotations

import ast
import os
import pickle
import subprocess
import sys
from enum import IntEnum
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tractor_session.envelope import (
    _TRACTOR_RT_VARS_OSENV,
    MAX_DEPTH,
    MAX_ENVELOPE_BYTES,
    EnvelopeError,
    RuntimeVars,
    dump_rtvars,
    get_rtvars,
    load_rtvars,
    update_rtvars,
)

NAME = '_TRACTOR_RT_VARS'
TCP_ADDR = ('127.0.0.1', 24011)
UDS_ADDR = ('/some/dir/tractor', 'registry@1616.sock')
UUID = '0b9a3c2e-7f41-4d8a-9e57-3c1f2a6b8d90'
KNOWN_KEYS = frozenset(RuntimeVars.__struct_fields__) - {'extra'}

# `tractor.runtime._state._RUNTIME_VARS_DEFAULTS`, plus our two keys
TRACTOR_DEFAULTS: dict[str, Any] = {
    '_is_root': False,
    '_root_mailbox': (None, None),
    '_root_addrs': [],
    '_enable_tpts': ['tcp'],
    '_registry_addrs': [],
    '_debug_mode': False,
    'repl_fixture': False,
    'use_greenback': False,
    'use_stackscope': False,
    '_is_infected_aio': False,
}


def full(**changes: Any) -> dict[str, Any]:
    '''A complete (canonical) envelope dict.'''
    return {
        **TRACTOR_DEFAULTS,
        '_session_uuid': None,
        '_bindspace': None,
        **changes,
    }


def env_of(d: dict[str, Any] | str) -> dict[str, str]:
    return {NAME: d if isinstance(d, str) else str(d)}


# -- round trips --------------------------------------------------------------

def test_name() -> None:
    assert _TRACTOR_RT_VARS_OSENV == NAME


@pytest.mark.parametrize('addr', [TCP_ADDR, UDS_ADDR])
def test_exact_round_trip_keeps_tuples(addr: tuple[str, str | int]) -> None:
    d = full(
        _root_mailbox=addr,
        _root_addrs=[addr],
        _registry_addrs=[addr],
        _enable_tpts=['tcp' if type(addr[1]) is int else 'uds'],
        _debug_mode=True,
        _session_uuid=UUID,
        _bindspace='/run/user/1000/tractor/0b9a3c2e',
    )
    name, value = dump_rtvars(d)
    assert name == NAME
    assert value == str(d)
    assert ast.literal_eval(value) == d
    back = load_rtvars({name: value}).to_dict()
    assert back == d
    assert type(back['_registry_addrs'][0]) is tuple
    assert type(back['_root_mailbox']) is tuple
    assert str(back) == value


def test_struct_round_trip() -> None:
    rt = RuntimeVars(_registry_addrs=[UDS_ADDR], _enable_tpts=['uds'])
    assert load_rtvars(dict([dump_rtvars(rt)])) == rt


def test_dump_of_partial_dict_is_completed_with_defaults() -> None:
    _, value = dump_rtvars({'_debug_mode': True})
    assert ast.literal_eval(value) == full(_debug_mode=True)


def test_addr_lists_given_as_tuples_become_lists() -> None:
    rt = RuntimeVars.from_dict(
        {'_registry_addrs': (TCP_ADDR,), '_enable_tpts': ('tcp',)}
    )
    assert rt._registry_addrs == [TCP_ADDR]
    assert rt._enable_tpts == ['tcp']


def test_unknown_keys_kept_through_load_and_dump() -> None:
    newer = {
        **full(),
        '_ctl_sock': '/run/user/1000/tractor-session/ctl.sock',
        'future': {'nested': [(1, 2.5), None, 'x']},
        'extra': 'a key named like the attribute holding unknown keys',
    }
    rt = load_rtvars(env_of(newer))
    assert rt.extra == {
        k: v for k, v in newer.items() if k not in KNOWN_KEYS
    }
    assert rt.to_dict() == newer
    _, value = dump_rtvars(rt)
    assert ast.literal_eval(value) == newer


def test_defaults_equal_tractors() -> None:
    d = RuntimeVars().to_dict()
    assert d == full()
    assert {k: d[k] for k in TRACTOR_DEFAULTS} == TRACTOR_DEFAULTS
    # mutable defaults are not shared between instances
    assert RuntimeVars()._enable_tpts is not RuntimeVars()._enable_tpts


def test_as_kwargs() -> None:
    rt = RuntimeVars(
        _is_root=True,
        _root_mailbox=TCP_ADDR,
        _root_addrs=[TCP_ADDR],
        _is_infected_aio=True,
        _registry_addrs=[TCP_ADDR],
        _enable_tpts=['tcp'],
        _debug_mode=True,
        use_greenback=True,
        use_stackscope=False,
        extra={'unknown': 1},
    )
    assert rt.as_kwargs() == {
        'registry_addrs': [TCP_ADDR],
        'enable_transports': ['tcp'],
        'debug_mode': True,
        'maybe_enable_greenback': True,
        'enable_stack_on_sig': False,
    }
    # copies: a caller mutating them does not change the struct
    rt.as_kwargs()['registry_addrs'].clear()
    assert rt._registry_addrs == [TCP_ADDR]


def test_error_type_and_key() -> None:
    with pytest.raises(EnvelopeError) as info:
        load_rtvars(env_of({'_registry_addrs': [1, 2]}))
    err = info.value
    assert isinstance(err, ValueError)
    assert err.key == '_registry_addrs'
    assert str(err) == (
        "_TRACTOR_RT_VARS: key '_registry_addrs': expected a list of "
        "2-tuples (host, port|filename), got [1, 2]"
    )
    again = pickle.loads(pickle.dumps(err))
    assert (str(again), again.key) == (str(err), err.key)


def test_not_set() -> None:
    with pytest.raises(EnvelopeError, match='not set'):
        load_rtvars({})


def test_error_message_stays_short() -> None:
    with pytest.raises(EnvelopeError) as info:
        load_rtvars(env_of({'_debug_mode': 'x' * 10_000}))
    assert len(str(info.value)) < 200


# -- dump refuses what load would refuse --------------------------------------

class Color(IntEnum):
    RED = 1


def _cyclic() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


@pytest.mark.parametrize(
    'd, match',
    [
        ({'_debug_mode': 1}, "'_debug_mode'.*bool"),
        ({'_registry_addrs': [('h', 70000)]}, 'out of range'),
        ({'unknown': Path('/x')}, 'not a literal'),
        ({'unknown': {1, 2}}, 'not a literal'),
        ({'unknown': b'x'}, 'not a literal'),
        ({'unknown': 1j}, 'not a literal'),
        ({'unknown': Color.RED}, 'not a literal'),
        ({'unknown': float('nan')}, 'non-finite'),
        ({'unknown': float('inf')}, 'non-finite'),
        ({'unknown': _cyclic()}, 'deeper'),
        ({'unknown': 10 ** 5000}, 'cannot encode'),
        ({'unknown': 'x' * MAX_ENVELOPE_BYTES}, 'larger than'),
        ({1: 'x'}, 'keys must be str'),
        ({'extra': 1, '_debug_mode': True}, None),  # fine: not reserved
        (['not', 'a', 'dict'], 'top level must be a dict'),
    ],
)
def test_dump_validates(d: Any, match: str | None) -> None:
    if match is None:
        dump_rtvars(d)
        return
    with pytest.raises(EnvelopeError, match=match):
        dump_rtvars(d)


def test_dump_revalidates_a_mutated_struct() -> None:
    rt = RuntimeVars()
    rt._debug_mode = 1  # type: ignore[assignment]
    with pytest.raises(EnvelopeError, match="'_debug_mode'"):
        dump_rtvars(rt)


def test_known_key_inside_extra_refused() -> None:
    with pytest.raises(EnvelopeError, match="'_debug_mode'"):
        RuntimeVars(extra={'_debug_mode': True})


# -- update_rtvars ------------------------------------------------------------

def test_update_dict_env() -> None:
    env: dict[str, str] = {'OTHER': 'x'}
    name, value = update_rtvars({'_registry_addrs': [TCP_ADDR]}, env)
    assert env == {'OTHER': 'x', name: value}
    # applied on top of what is there
    update_rtvars({'_debug_mode': True, 'future': 1}, env)
    assert load_rtvars(env).to_dict() == {
        **full(_registry_addrs=[TCP_ADDR], _debug_mode=True),
        'future': 1,
    }


def test_update_with_struct_replaces() -> None:
    env = env_of(full(_debug_mode=True))
    update_rtvars(RuntimeVars(_enable_tpts=['uds']), env)
    assert load_rtvars(env) == RuntimeVars(_enable_tpts=['uds'])


def test_update_invalid_leaves_env_untouched() -> None:
    env = env_of(full(_debug_mode=True))
    before = dict(env)
    with pytest.raises(EnvelopeError, match="'_enable_tpts'"):
        update_rtvars({'_enable_tpts': ['quic']}, env)
    assert env == before


def test_update_invalid_current_envelope_raises() -> None:
    env = {NAME: 'garbage('}
    with pytest.raises(EnvelopeError):
        update_rtvars({'_debug_mode': True}, env)
    assert env == {NAME: 'garbage('}


def test_update_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NAME, raising=False)
    name, value = update_rtvars({'_session_uuid': UUID})
    assert os.environ[NAME] == value
    assert get_rtvars()._session_uuid == UUID
    # children inherit it
    out = subprocess.run(
        [sys.executable, '-c', f'import os; print(os.environ[{NAME!r}])'],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert out == value


def test_update_false_writes_nowhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NAME, str(full(_debug_mode=True)))
    name, value = update_rtvars({'use_greenback': True}, False)
    assert os.environ[NAME] == str(full(_debug_mode=True))
    assert ast.literal_eval(value) == full(
        _debug_mode=True, use_greenback=True
    )


def test_update_false_without_envelope(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(NAME, raising=False)
    _, value = update_rtvars(None, False)
    assert ast.literal_eval(value) == full()
    assert NAME not in os.environ


# -- get_rtvars ---------------------------------------------------------------

def test_get_rtvars_of_a_child_process() -> None:
    d = full(_registry_addrs=[UDS_ADDR], _enable_tpts=['uds'])
    env = {**os.environ, NAME: str(d)}
    proc = subprocess.Popen(
        [sys.executable, '-c', 'import sys; print("up", flush=True); sys.stdin.read()'],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        # Until the child has exec'd, /proc shows the parent's environment.
        assert proc.stdout is not None and proc.stdout.readline() == b'up\n'
        assert get_rtvars(psutil.Process(proc.pid)).to_dict() == d
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)


def test_get_rtvars_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NAME, str(full(_debug_mode=True)))
    assert get_rtvars()._debug_mode is True
    monkeypatch.delenv(NAME)
    with pytest.raises(EnvelopeError, match='not set'):
        get_rtvars()


def test_import_is_cheap() -> None:
    '''The module alone imports neither trio nor psutil.'''
    path = Path(__file__).parent.parent / 'tractor_session' / 'envelope.py'
    code = (
        'import importlib.util, sys\n'
        'spec = importlib.util.spec_from_file_location(\n'
        f'    "envelope", {str(path)!r})\n'
        'mod = importlib.util.module_from_spec(spec)\n'
        'spec.loader.exec_module(mod)\n'
        'assert "trio" not in sys.modules, "trio"\n'
        'assert "psutil" not in sys.modules, "psutil"\n'
    )
    subprocess.run([sys.executable, '-c', code], check=True)


# -- hostile input ------------------------------------------------------------

def _wrong(key: str, value: Any) -> str:
    return str({key: value})


HOSTILE: list[tuple[str, str]] = [
    # code must never run
    ("__import__('os').system('true')", 'not a literal'),
    ("{'a': __import__('os').getcwd()}", 'not a literal'),
    ('os', 'not a literal'),
    ("{'a': os}", 'not a literal'),
    ("{'a': os.environ}", 'not a literal'),
    ("{'a': lambda: 1}", 'not a literal'),
    ("{'a': f'{1}'}", 'not a literal'),
    ("{'a': [x for x in 'ab']}", 'not a literal'),
    ("{'a': set()}", 'not a literal'),
    ("{'a': (yield)}", 'not a literal'),
    ("{'a': 1 if 1 else 2}", 'not a literal'),
    ("{**{'a': 1}}", 'not a literal'),
    ("{'a': [*'ab']}", 'not a literal'),
    # literals of the wrong kind
    ("{'a': {1, 2}}", 'not a literal'),
    ("{'a': 1j}", 'not a literal'),
    ("{'a': 1+2j}", 'not a literal'),
    ("{'a': b'x'}", 'not a literal'),
    ("{'a': ...}", 'not a literal'),
    ("{'a': -True}", 'not a literal'),
    ("{'a': --1}", 'not a literal'),
    ("{'a': 1e999}", 'non-finite'),
    ("{[1]: 2}", 'not a literal'),
    ("{'a': {(1, [2]): 3}}", 'not a literal'),
    ('9' * 5000, 'not a literal'),
    # size and depth
    (str({'a': 'x' * MAX_ENVELOPE_BYTES}), 'larger than'),
    (str({'a': '\u00e9' * (MAX_ENVELOPE_BYTES // 2 + 1)}), 'larger than'),
    ('[' * 1000 + ']' * 1000, 'not a literal'),
    ("{'a':" * 1000 + '1' + '}' * 1000, 'not a literal'),
    ('{"a": ' + '[' * MAX_DEPTH + ']' * MAX_DEPTH + '}', 'deeper'),
    ('-' * 60_000 + '1', 'too deeply nested'),
    ('+'.join(['1'] * 30_000), 'too deeply nested'),
    # top level
    ('[1, 2]', 'top level must be a dict'),
    ("'just a string'", 'top level must be a dict'),
    ('None', 'top level must be a dict'),
    ('{1: 2}', 'keys must be str'),
    ("{('a',): 2}", 'keys must be str'),
    # garbage
    ('', 'empty'),
    ('   \n', 'empty'),
    ('{', 'not a literal'),
    ("{'a': 1", 'not a literal'),
    ('\x00', 'not a literal'),
    ("{'a': '\x00'}", 'not a literal'),
    ("{'a': '\ud800'}", 'not a literal'),
    ('\U0001f600', 'not a literal'),
    # known keys, wrong values
    (_wrong('_registry_addrs', [1, 2]), "'_registry_addrs'.*2-tuples"),
    (_wrong('_registry_addrs', 'h:1'), "'_registry_addrs'"),
    (_wrong('_registry_addrs', [('h',)]), "'_registry_addrs'"),
    (_wrong('_registry_addrs', [('h', 1, 2)]), "'_registry_addrs'"),
    (_wrong('_registry_addrs', [['h', 1]]), "'_registry_addrs'"),
    (_wrong('_registry_addrs', [('h', -1)]), "'_registry_addrs'.*range"),
    (_wrong('_registry_addrs', [('h', 70000)]), "'_registry_addrs'.*range"),
    (_wrong('_registry_addrs', [('h', True)]), "'_registry_addrs'"),
    (_wrong('_registry_addrs', [('h', 1.5)]), "'_registry_addrs'"),
    (_wrong('_registry_addrs', [('', 1)]), "'_registry_addrs'.*empty"),
    (_wrong('_registry_addrs', [(1, 1)]), "'_registry_addrs'"),
    (_wrong('_registry_addrs', [('h\x00', 1)]), "'_registry_addrs'.*NUL"),
    (
        _wrong('_registry_addrs', [('/d', 'a\x00.sock')]),
        "'_registry_addrs'.*NUL",
    ),
    (_wrong('_registry_addrs', [('/d', '')]), "'_registry_addrs'.*empty"),
    (_wrong('_root_addrs', [('h', 70000)]), "'_root_addrs'"),
    (_wrong('_root_addrs', None), "'_root_addrs'"),
    (_wrong('_enable_tpts', ['quic']), "'_enable_tpts'"),
    (_wrong('_enable_tpts', 'tcp'), "'_enable_tpts'"),
    (_wrong('_enable_tpts', [1]), "'_enable_tpts'"),
    (_wrong('_root_mailbox', ['h', 1]), "'_root_mailbox'"),
    (_wrong('_root_mailbox', ('h',)), "'_root_mailbox'"),
    (_wrong('_root_mailbox', ('h', 70000)), "'_root_mailbox'.*range"),
    (_wrong('_root_mailbox', (1, 1)), "'_root_mailbox'"),
    (_wrong('_debug_mode', 1), "'_debug_mode'.*bool"),
    (_wrong('_debug_mode', 'True'), "'_debug_mode'.*bool"),
    (_wrong('_debug_mode', None), "'_debug_mode'.*bool"),
    (_wrong('_is_root', 0), "'_is_root'.*bool"),
    (_wrong('repl_fixture', 'some.module:fixture'), "'repl_fixture'.*bool"),
    (_wrong('use_greenback', 1), "'use_greenback'.*bool"),
    (_wrong('use_stackscope', []), "'use_stackscope'.*bool"),
    (_wrong('_is_infected_aio', 1.0), "'_is_infected_aio'.*bool"),
    (_wrong('_session_uuid', '../../etc'), "'_session_uuid'.*uuid"),
    (_wrong('_session_uuid', UUID.upper()), "'_session_uuid'.*uuid"),
    (_wrong('_session_uuid', UUID + '\n'), "'_session_uuid'.*uuid"),
    (_wrong('_session_uuid', UUID[:8]), "'_session_uuid'.*uuid"),
    (_wrong('_session_uuid', 1), "'_session_uuid'.*uuid"),
    (_wrong('_bindspace', 'relative/x'), "'_bindspace'.*absolute"),
    (_wrong('_bindspace', '/run/user/1/../../etc'), "'_bindspace'"),
    (_wrong('_bindspace', '/tmp/a\x00b'), "'_bindspace'.*NUL"),
    (_wrong('_bindspace', ''), "'_bindspace'"),
    (_wrong('_bindspace', ['/tmp']), "'_bindspace'"),
]


@pytest.mark.parametrize(
    'value, match',
    HOSTILE,
    ids=[f'{i}:{value[:30]!r}' for i, (value, _) in enumerate(HOSTILE)],
)
def test_hostile_input_refused(value: str, match: str) -> None:
    with pytest.raises(EnvelopeError, match=match):
        load_rtvars({NAME: value})


@pytest.mark.parametrize(
    'template',
    [
        "__import__('os').system('touch {x}')",
        "{{'a': __import__('os').system('touch {x}')}}",
        "{{'_bindspace': __import__('os').system('touch {x}') or '/t'}}",
        "[{{'a': (lambda: __import__('os').system('touch {x}'))()}}]",
    ],
)
def test_code_never_runs(tmp_path: Path, template: str) -> None:
    marker = tmp_path / 'X'
    with pytest.raises(EnvelopeError, match='not a literal'):
        load_rtvars({NAME: template.format(x=marker)})
    assert not marker.exists()


def test_depth_limit_is_inclusive() -> None:
    # the top-level dict is level 1: MAX_DEPTH - 1 lists fit, one more not
    fits = '{"a": ' + '[' * (MAX_DEPTH - 1) + ']' * (MAX_DEPTH - 1) + '}'
    load_rtvars({NAME: fits})
    deep: Any = []
    for _ in range(MAX_DEPTH - 2):
        deep = [deep]
    dump_rtvars({'a': deep})
    with pytest.raises(EnvelopeError, match='deeper'):
        dump_rtvars({'a': [deep]})


# -- properties ---------------------------------------------------------------

_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
_hashables = st.none() | st.booleans() | st.integers() | st.text(max_size=8)


def _nest(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(children, max_size=3)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(_hashables, children, max_size=3)
    )


_literals: st.SearchStrategy[Any] = _leaves
for _ in range(4):
    _literals = _leaves | _nest(_literals)

_unknown_keys = (st.just('extra') | st.text(max_size=12)).filter(
    lambda k: k not in KNOWN_KEYS
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_unknown_keys, _literals, max_size=5))
def test_unknown_literals_round_trip(unknown: dict[str, Any]) -> None:
    name, value = dump_rtvars(unknown)
    rt = load_rtvars({name: value})
    # repr comparison: also tells True from 1 from 1.0, tuple from list
    assert repr(rt.extra) == repr(unknown)
    assert str(rt.to_dict()) == value
    assert ast.literal_eval(value) == rt.to_dict()


_near_literal = st.text(
    alphabet="[](){}'\",:0123456789-+.eEjxbf_ \\\x00TrueFalsNo",
    max_size=60,
)


@settings(max_examples=500, deadline=None)
@given(
    st.text(alphabet=st.characters(blacklist_categories=()), max_size=200)
    | _near_literal
)
def test_random_text_only_raises_envelope_error(text: str) -> None:
    try:
        rt = load_rtvars({NAME: text})
    except EnvelopeError:
        return
    # whatever loads must dump back to something that loads equal
    assert load_rtvars(dict([dump_rtvars(rt)])) == rt
