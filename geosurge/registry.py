"""One registry type for every "name -> implementation" table (backbones, segmenters, runtime backends), and its one
``register`` decorator (standard library only, so the runtime may use it).

Callers ask a registry for its names (CLI choices, help text, error messages) instead of repeating them::

    BACKBONES = Registry("backbone family")

    @BACKBONES.register("timm")
    class TimmBackbone(nn.Module): ...

    BACKBONES.get("timm")          # the class; ValueError naming the registered ones otherwise
    list(BACKBONES)                # the names, in registration order

An entry may also be a lazy ``"module:attribute"`` string (:meth:`Registry.lazy`): the module is imported only when
that entry is asked for, so a registry of backends does not import every backend's library.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any, Callable, Iterable


class Registry(dict):
    """A ``dict`` of name -> implementation with a decorator to fill it and a lookup that names the alternatives.

    ``kind`` names what is registered, for error messages (``unknown backbone family 'x'; registered: ...``).
    """

    def __init__(self, kind: str, entries: Iterable[tuple[str, Any]] | dict | None = None):
        super().__init__(entries or {})
        self.kind = kind

    def register(self, name: str) -> Callable:
        """Decorator: ``@REGISTRY.register("name")`` adds the class or function under ``name`` and returns it."""

        def deco(obj):
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self[name] = obj
            return obj

        return deco

    def lazy(self, name: str, target: str) -> None:
        """Register ``"package.module:Attribute"``, imported on first :meth:`get`."""
        self[name] = target

    def get(self, name: str):  # type: ignore[override]
        """The implementation registered under ``name`` (a lazy entry is imported now). Raises ValueError naming
        the registered names when ``name`` is unknown."""
        try:
            obj = self[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(map(str, self))}") from None
        if isinstance(obj, str) and ":" in obj:
            module, attr = obj.split(":")
            obj = getattr(import_module(module), attr)
        return obj

    def names(self) -> list[str]:
        return [str(k) for k in self]
