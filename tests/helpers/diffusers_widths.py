"""diffusers' FLUX.1 converters at a tiny model's widths.

``convert_flux_transformer_checkpoint_to_diffusers`` (``inner_dim = 3072``) and
``_convert_kohya_flux_lora_to_diffusers`` (``dims=[3072, 3072, 3072, 12288]`` for ``linear1``)
hard-code FLUX.1's real width, so a tiny FLUX (width 32) cannot go through them as shipped.
:func:`with_constants` returns the SAME function (diffusers' own code object, every other constant
and line unchanged) with those integers replaced, recursively into nested functions; the tests
monkeypatch it where diffusers looks the converter up.
"""

from __future__ import annotations

import types
from typing import Callable, Mapping


def _const(c, table: Mapping[int, int]):
    if isinstance(c, types.CodeType):
        return _code(c, table)
    if type(c) is tuple:          # constant lists such as [3072, 3072, 3072, 12288] compile to a tuple
        return tuple(_const(x, table) for x in c)
    if type(c) is int and c in table:
        return table[c]
    return c


def _code(code: types.CodeType, table: Mapping[int, int]) -> types.CodeType:
    return code.replace(co_consts=tuple(_const(c, table) for c in code.co_consts))


def with_constants(fn: Callable, table: Mapping[int, int]) -> Callable:
    """``fn`` with the integer literals in ``table`` replaced (same globals, defaults and name)."""
    new = types.FunctionType(_code(fn.__code__, table), fn.__globals__, fn.__name__, fn.__defaults__,
                             fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    return new


def flux_widths(inner: int, mlp: int) -> dict[int, int]:
    """FLUX.1's widths (3072, 4 x 3072) -> a tiny model's."""
    return {3072: inner, 12288: mlp}
