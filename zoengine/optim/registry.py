"""Method registry: ``create("mezo", params, **kw)``; each method module registers itself."""

from __future__ import annotations

from collections.abc import Callable

_METHODS: dict[str, Callable] = {}


def register_method(name: str, factory: Callable) -> None:
    """Make ``factory(params, **kw)`` available as ``create(name, ...)`` and ``--method name``."""
    _METHODS[name] = factory


def available_methods() -> tuple[str, ...]:
    return tuple(sorted(_METHODS))


def create(name: str, params, **kwargs):
    """Build the optimizer registered under ``name``."""
    if name not in _METHODS:
        raise ValueError(f"method={name!r}: must be one of {available_methods()}")
    return _METHODS[name](params, **kwargs)
