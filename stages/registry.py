"""Registries: adding a stage or an encoder is one class and one decorator line."""
from __future__ import annotations

from typing import Callable, TypeVar

from stages.base import Stage

STAGES: dict[str, type[Stage]] = {}
T = TypeVar("T", bound=type)


def register_stage(cls: T) -> T:
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if cls.name in STAGES and STAGES[cls.name] is not cls:
        raise ValueError(f"stage {cls.name!r} registered twice")
    STAGES[cls.name] = cls
    return cls


def get_stage(name: str, load_all: bool = True) -> type[Stage]:
    """The stage class registered as ``name``. Imports only its module (``cleanup.image`` ->
    ``stages.cleanup.image``, else the nearest package) so actors do not load every model library."""
    import importlib

    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        if name in STAGES:
            break
        try:
            importlib.import_module("stages." + ".".join(parts[:k]))
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("stages"):
                raise
    if name not in STAGES and not _load_entry_point(name) and load_all:
        load_builtin()
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; known: {', '.join(sorted(STAGES))}") from None


ENTRY_POINT_GROUP = "mmpipe.stages"


def _load_entry_point(name: str) -> bool:
    """A stage another installed package declares under the ``mmpipe.stages`` entry point group."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            STAGES[name] = _check(ep.load(), ep.value)
            return True
    return False


def resolve_stage(ref: str, load_all: bool = True) -> type[Stage]:
    """A stage by registered name (built-in or entry point), or by import path ``package.module:Class``
    (a stage from the user's own package; it must be importable wherever the stages run)."""
    if ":" not in ref:
        return get_stage(ref, load_all)
    import importlib

    module, _, attr = ref.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise KeyError(f"cannot import stage {ref!r}: {exc}") from None
    return _check(cls, ref)


def _check(cls: object, ref: str) -> type[Stage]:
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise KeyError(f"{ref!r} is not a stage class (a subclass of stages.base.Stage)")
    if not cls.name:
        raise KeyError(f"stage class {ref!r} has no name")
    return cls


_loaded = False


def load_builtin() -> None:
    """Import the modules that register the built-in stages (kept lazy: heavy imports)."""
    global _loaded
    if _loaded:
        return
    import importlib
    import pkgutil

    import stages

    for mod in pkgutil.walk_packages(stages.__path__, "stages."):
        if mod.name not in ("stages.base", "stages.registry"):
            importlib.import_module(mod.name)
    _loaded = True


def registry(kind: str) -> tuple[dict[str, T], Callable[[T], T]]:
    """A named registry for other plug-in kinds (encoders, fusions): returns (table, decorator)."""
    table: dict[str, T] = {}

    def add(cls: T) -> T:
        key = getattr(cls, "name")
        if key in table and table[key] is not cls:
            raise ValueError(f"{kind} {key!r} registered twice")
        table[key] = cls
        return cls

    return table, add
