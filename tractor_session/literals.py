'''
The envelope's text: untrusted ``str(dict)`` read without evaluating code.

Any process can set ``_TRACTOR_RT_VARS``, so its value is hostile input
until proven otherwise: it is parsed with ``ast.parse``, only literal nodes
of the envelope types are accepted, size and nesting are bounded before
``literal_eval`` runs, and every failure is an `EnvelopeError`. What the
values *mean* is checked by :mod:`tractor_session.rtvars`.
'''
from __future__ import annotations

import ast
import math
import warnings
from typing import Any

from tractor_session.envelope import _TRACTOR_RT_VARS_OSENV

# Bounds on hostile input: the size is checked before parsing, the nesting
# depth (containers, the top-level dict counts as 1) before `literal_eval`,
# whose recursion a deep value could otherwise exhaust.
MAX_ENVELOPE_BYTES: int = 64 * 1024
MAX_DEPTH: int = 32

_LEAF_TYPES: tuple[type, ...] = (str, int, float, bool, type(None))
_CONTAINER_TYPES: tuple[type, ...] = (list, tuple, dict)
_ERR_REPR_MAX: int = 80


class EnvelopeError(ValueError):
    '''
    The one exception every envelope failure raises: variable not set,
    too big, not a literal, too deep, or a known key with a wrong value.

    ``key`` is the offending top-level key, or None when the problem is
    not tied to one.
    '''

    def __init__(self, problem: str, key: str | None = None) -> None:
        # both in `args`, so the error pickles back to itself
        super().__init__(problem, key)
        self.problem: str = problem
        self.key: str | None = key

    def __str__(self) -> str:
        where: str = f' key {self.key!r}:' if self.key is not None else ''
        return f'{_TRACTOR_RT_VARS_OSENV}:{where} {self.problem}'


def short(value: Any) -> str:
    '''`repr` capped in length: error messages must stay readable even
    when the offending value is 64 KiB.'''
    text: str = repr(value)
    if len(text) > _ERR_REPR_MAX:
        return text[:_ERR_REPR_MAX] + '...'
    return text


def check_literal(value: Any, key: str) -> None:
    '''
    Check that an unknown key's value is made only of envelope literals, so
    that ``str()`` of it reads back equal. Exact types: a subclass (an
    `IntEnum`, a `str` subclass) can have a `repr` that is not a literal.
    Iterative, so a cyclic or very deep value cannot exhaust the stack.
    '''
    stack: list[tuple[Any, int]] = [(value, 2)]  # 1 is the top-level dict
    while stack:
        item, depth = stack.pop()
        kind: type = type(item)
        if kind is float and not math.isfinite(item):
            raise EnvelopeError(f'non-finite float {item!r}', key)
        if kind in _LEAF_TYPES:
            continue
        if kind not in _CONTAINER_TYPES:
            raise EnvelopeError(
                f'not a literal: {kind.__name__} {short(item)}', key
            )
        if depth > MAX_DEPTH:
            raise EnvelopeError(f'nested deeper than {MAX_DEPTH}', key)
        children = (
            [*item.keys(), *item.values()] if kind is dict else item
        )
        stack.extend((child, depth + 1) for child in children)


# -- parsing ---------------------------------------------------------------

def _check_tree(tree: ast.Expression) -> None:
    '''
    Refuse anything but literal nodes of the envelope types, and nesting
    deeper than `MAX_DEPTH`, before `literal_eval` runs. `literal_eval`
    alone would accept sets, bytes, complex numbers and ``1+2j``
    arithmetic, and could recurse without bound.
    '''
    stack: list[tuple[ast.AST, int]] = [(tree.body, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, ast.Constant):
            if type(node.value) not in _LEAF_TYPES:
                raise EnvelopeError(
                    f'not a literal: {type(node.value).__name__} constant'
                )
            if type(node.value) is float and not math.isfinite(node.value):
                raise EnvelopeError('non-finite float')
        elif isinstance(node, ast.UnaryOp):
            # negative numbers: `-1` is `USub(1)` in the tree
            if not (
                isinstance(node.op, ast.USub | ast.UAdd)
                and isinstance(node.operand, ast.Constant)
                and type(node.operand.value) in (int, float)
            ):
                raise EnvelopeError('not a literal: unary operator')
        elif isinstance(node, ast.List | ast.Tuple | ast.Dict):
            if depth > MAX_DEPTH:
                raise EnvelopeError(f'nested deeper than {MAX_DEPTH}')
            if isinstance(node, ast.Dict):
                if None in node.keys:
                    raise EnvelopeError('not a literal: ** unpacking')
                children: list[ast.AST] = [k for k in node.keys if k is not None]
                children += node.values
            else:
                children = list(node.elts)
            stack.extend((child, depth + 1) for child in children)
        else:
            raise EnvelopeError(f'not a literal: {type(node).__name__}')


def parse(value: str) -> Any:
    '''Untrusted envelope text to a literal value, or `EnvelopeError`.'''
    if type(value) is not str:
        raise EnvelopeError(f'value must be a str, got {type(value).__name__}')
    # cheap bound first: a char is at least one byte
    if len(value) > MAX_ENVELOPE_BYTES or len(
        value.encode('utf-8', 'surrogatepass')
    ) > MAX_ENVELOPE_BYTES:
        raise EnvelopeError(f'value larger than {MAX_ENVELOPE_BYTES} bytes')
    if not value.strip():
        raise EnvelopeError('empty value')
    try:
        # Hostile text may make the parser warn (invalid escapes, ...): the
        # warning would land in the log of whoever reads the envelope.
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            tree: ast.Expression = ast.parse(value, mode='eval')
    except (RecursionError, MemoryError):
        # what CPython's parser raises on deep nesting ("too complex")
        raise EnvelopeError('too deeply nested to parse') from None
    except (SyntaxError, ValueError) as err:
        # ValueError: NUL bytes or lone surrogates in the text
        raise EnvelopeError(f'not a literal: {err}') from None
    _check_tree(tree)
    try:
        return ast.literal_eval(tree.body)
    except (ValueError, TypeError, RecursionError, MemoryError) as err:
        # e.g. an unhashable dict key: `{[1]: 2}`
        raise EnvelopeError(
            f'not a literal: {type(err).__name__}: {err}'
        ) from None
