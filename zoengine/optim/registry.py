"""Method registry: ``create("mezo", params, **kw)``; each method module registers itself.

A name maps to a record: the optimizer class and the keyword arguments the name fixes (e.g.
``"pezo-rotate"`` is ``PeZO`` with ``reuse="rotate"``). Tools that price a method without
building it (the memory planner, hwsim) ask the class: ``method_spec(name).cls.memory_extras(
**method_spec(name).fixed, ...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: ``cls`` (its accounting lives there), the keyword arguments the
    name fixes, and an optional factory used instead of ``cls`` to build it."""

    name: str
    cls: type
    fixed: Mapping = field(default_factory=dict)
    factory: Callable | None = None

    def build(self, params, **kwargs):
        clash = sorted(k for k in kwargs if k in self.fixed and kwargs[k] != self.fixed[k])
        if clash:
            k = clash[0]
            raise ValueError(f"{k}={kwargs[k]!r}: method {self.name!r} fixes "
                             f"{k}={self.fixed[k]!r}")
        return (self.factory or self.cls)(params, **{**self.fixed, **kwargs})


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, method: type | Callable, /, *, cls: type | None = None,
                    replace: bool = False, **fixed) -> None:
    """Make ``method(params, **fixed, **kw)`` available as ``create(name, ...)`` and
    ``--method name``. ``method`` is an optimizer class, or a factory together with ``cls=``,
    the class it builds (needed for accounting). A name already registered is refused
    (``ValueError``) unless ``replace=True``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_method({name!r}, ...): the name must be a non-empty str")
    if name in _METHODS and not replace:
        raise ValueError(f"register_method({name!r}, ...): {name!r} is registered already (as "
                         f"{_METHODS[name].cls.__name__}); choose another name, or pass "
                         "replace=True to replace it")
    if isinstance(method, type):
        cls, factory = method, None
    elif callable(method) and isinstance(cls, type):
        factory = method
    else:
        raise ValueError(f"register_method({name!r}, {method!r}): method must be an optimizer "
                         "class, or a factory with cls=<the class it builds>")
    _METHODS[name] = MethodSpec(name, cls, MappingProxyType(dict(fixed)), factory)


def available_methods() -> tuple[str, ...]:
    return tuple(sorted(_METHODS))


def method_spec(name: str) -> MethodSpec:
    """The record registered under ``name``."""
    if name not in _METHODS:
        raise ValueError(f"method={name!r}: must be one of {available_methods()}")
    return _METHODS[name]


def method_name(cls: type) -> str:
    """The name under which ``cls`` itself is registered (no fixed options, no factory): what a
    journal header records, so a replay rebuilds the optimizer with ``create(name, ...)``."""
    for spec in _METHODS.values():
        if spec.cls is cls and not spec.fixed and spec.factory is None:
            return spec.name
    raise ValueError(f"{cls.__module__}.{cls.__qualname__} is not in zoengine's method "
                     "registry: register it (zoengine.optim.register_method(name, cls)) to "
                     "journal or replay it")


def create(name: str, params, **kwargs):
    """Build the optimizer registered under ``name``."""
    return method_spec(name).build(params, **kwargs)
