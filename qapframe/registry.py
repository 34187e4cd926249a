"""One generic registry type; quantizers, scorers, pruners and model adapters each get an instance.

Built-ins register with a decorator at their definition. Third-party packages register through
Python entry points (group ``qapframe.<kind>s``), discovered lazily on the first lookup so that
importing qapframe never imports a plugin, and a broken plugin only costs a warning.

Entry points are read with the standard library's `importlib.metadata`, not the ``entrypoints`` package
the design card named: both read the same ``entry_points.txt`` of each installed distribution, so a plugin
declares them the same way either way (and never depends on either package), and ``entrypoints`` is
deprecated upstream in favour of `importlib.metadata`, which is complete from Python 3.10, our minimum.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import re
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable, Generic, Iterator, TypeVar

from qapframe.errors import DuplicateNameError, UnknownNameError

T = TypeVar("T")

BUILTIN = "built-in"


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered object with the name it answers to and where it came from."""

    name: str
    obj: T
    source: str  # "built-in" or "<distribution> <version> (module:object)"


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _normalize(distribution: str) -> str:
    """PEP 503 name: dist-info folders spell "my-plugin" as "my_plugin"."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


class Registry(Generic[T]):
    """Name -> object map with lazy entry-point discovery and helpful lookup errors."""

    def __init__(self, kind: str, group: str, builtin_modules: tuple[str, ...] = ()):
        self.kind = kind
        self.group = group
        # Modules whose import registers the built-ins; imported on first lookup so that
        # `qapframe.registry` stays import-cycle free.
        self._builtin_modules = builtin_modules
        self._entries: dict[str, Entry[T]] = {}
        self._discovered = False

    # -- registration -------------------------------------------------------------------------
    def register(self, name: str | None = None, *, override: bool = False) -> Callable[[T], T]:
        """Decorator registering a built-in under ``name`` (default: the object's ``name``)."""

        def decorator(obj: T) -> T:
            self.add(name or getattr(obj, "name"), obj, BUILTIN, override=override)
            return obj

        return decorator

    def add(self, name: str, obj: T, source: str, *, override: bool = False) -> None:
        existing = self._entries.get(name)
        if existing is not None and existing.obj is not obj and not override:
            raise DuplicateNameError(
                f"{self.kind} name {name!r} is registered twice: by {existing.source} and by "
                f"{source}; rename one, or pass override=True to replace it"
            )
        if isinstance(obj, type) and getattr(obj, "name", None) in (None, ""):
            obj.name = name  # type: ignore[attr-defined]
        self._entries[name] = Entry(name, obj, source)

    # -- discovery ------------------------------------------------------------------------------
    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        for module in self._builtin_modules:
            importlib.import_module(module)
        for ep in entry_points(group=self.group):
            dist = ep.dist
            distro = f"{_normalize(dist.name)} {dist.version}" if dist is not None else "unknown distribution"
            source = f"{distro} ({ep.value})"
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not take the host down
                warnings.warn(
                    f"qapframe: skipping {self.kind} plugin {ep.name!r} from {source}: "
                    f"{type(exc).__name__}: {exc}",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            self.add(ep.name, obj, source)

    def reload(self) -> None:
        """Forget plugin entries and discover again (tests install plugins at run time)."""
        self._entries = {n: e for n, e in self._entries.items() if e.source == BUILTIN}
        self._discovered = False

    # -- lookup ---------------------------------------------------------------------------------
    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry[T]:
        self._discover()
        try:
            return self._entries[name]
        except KeyError:
            known = self.names()
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(known) or '(none)'}{hint}"
            ) from None

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching an fnmatch pattern, naturally sorted."""
        self._discover()
        return sorted(fnmatch.filter(self._entries, pattern), key=_natural_key)

    def entries(self, pattern: str = "*") -> list[Entry[T]]:
        return [self._entries[n] for n in self.names(pattern)]

    def __contains__(self, name: str) -> bool:
        self._discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, group={self.group!r})"
