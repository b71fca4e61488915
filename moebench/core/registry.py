"""Name -> class registries for routers and tasks.

Routers and tasks register themselves with a decorator in their own module, so adding one is one new
file. Third-party packages add entries through the ``moebench.routers`` / ``moebench.tasks``
entry-point groups; the built-in ``routers`` / ``tasks`` packages are imported lazily on first lookup.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import pkgutil
import re
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points

_NAME_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class Registry:
    """A kebab-case name -> object table, filled by ``@registry.register("name")``. With ``base``
    (``"module:Class"``, imported on the first registration so that listing names stays torch-free),
    only subclasses of that class are accepted: ``ROUTERS`` holds `Router` subclasses, ``TASKS``
    `Task` subclasses."""

    def __init__(self, kind: str, builtin_package: str, entry_point_group: str, base: str | None = None):
        self.kind = kind
        self.builtin_package = builtin_package
        self.entry_point_group = entry_point_group
        self.base = base
        self._entries: dict[str, object] = {}
        self._descriptions: dict[str, str] = {}
        self._loaded = False

    def register(self, name: str, description: str | None = None) -> Callable:
        if not _NAME_RE.match(name):
            raise ValueError(f"{self.kind} name {name!r} must be kebab-case (e.g. 'softmax-topk')")

        def decorator(obj):
            self.check(name, obj)
            if name in self._entries and self._entries[name] is not obj:
                old = self._entries[name]
                raise ValueError(
                    f"{self.kind} {name!r} is registered twice: {old.__module__}.{old.__qualname__} "
                    f"and {obj.__module__}.{obj.__qualname__}; rename one of them"
                )
            self._entries[name] = obj
            self._descriptions[name] = description or _first_line(obj.__doc__)
            obj.registry_name = name
            return obj

        return decorator

    def check(self, name: str, obj) -> None:
        """Refuse, with the reason, an entry that is not a subclass of the registry's ``base``."""
        if self.base is None:
            return
        module, _, cls_name = self.base.partition(":")
        base = getattr(importlib.import_module(module), cls_name)
        if not (isinstance(obj, type) and issubclass(obj, base)):
            what = (
                f"class {obj.__module__}.{obj.__qualname__}"
                if isinstance(obj, type)
                else f"{type(obj).__name__} {obj!r}"
            )
            raise TypeError(
                f"{self.kind} {name!r} must be a subclass of {module}.{cls_name} (the {self.kind} "
                f"contract: see its docstring), got {what}"
            )

    def load(self) -> None:
        """Import the built-in modules and the entry points once, so they register themselves."""
        if self._loaded:
            return
        self._loaded = True
        package = importlib.import_module(self.builtin_package)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.builtin_package}.{info.name}")
        for ep in entry_points(group=self.entry_point_group):
            obj = ep.load()
            if getattr(obj, "registry_name", None) is None:  # a plain class: register under ep.name
                self.register(ep.name)(obj)

    def get(self, name: str):
        self.load()
        if name not in self._entries:
            known = sorted(self._entries)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {', '.join(known)}. "
                f"To add one, register it with @register_{self.kind}('name') "
                f"(or the '{self.entry_point_group}' entry-point group)."
            )
        return self._entries[name]

    def names(self) -> list[str]:
        self.load()
        return sorted(self._entries)

    def builtin_names(self) -> list[str]:
        """Names that ship with moebench (defined in the built-in package), not plugins or test doubles."""
        self.load()
        prefix = self.builtin_package + "."
        return sorted(n for n, obj in self._entries.items() if obj.__module__.startswith(prefix))

    def describe(self) -> list[tuple[str, str]]:
        self.load()
        return [(n, self._descriptions[n]) for n in sorted(self._entries)]

    def listing(self) -> list[tuple[str, str]]:
        """(name, description) of every entry, like ``describe``, but without importing the built-in
        modules (they import torch, ~2-5 s): their ``@register_<kind>("name", "description")``
        decorators are read from the source. A module whose decorator is not plain literals is
        imported; entry-point plugins are always imported (their source may not be at hand)."""
        if self._loaded:
            return self.describe()
        found: dict[str, str] = {}
        package = importlib.import_module(self.builtin_package)  # its __init__ is only a docstring
        for info in pkgutil.iter_modules(package.__path__):
            if info.name.startswith("_"):
                continue
            module = f"{self.builtin_package}.{info.name}"
            static = _static_registrations(module, self.kind)
            if static is None:
                importlib.import_module(module)
            else:
                found.update(static)
        for ep in entry_points(group=self.entry_point_group):
            obj = ep.load()
            if getattr(obj, "registry_name", None) is None:
                self.register(ep.name)(obj)
        found.update(self._descriptions)  # plugins, and anything imported or registered already
        return sorted(found.items())

    def __contains__(self, name: str) -> bool:
        self.load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n")[0].strip()


def _static_registrations(module: str, kind: str) -> dict[str, str] | None:
    """``{name: description}`` from the ``@register_<kind>(...)`` / ``@<REGISTRY>.register(...)``
    decorators in ``module``'s source, read with ``ast`` (nothing is imported). None when the source
    cannot be read or a decorator's arguments are not string literals: then the caller imports it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    try:
        with open(spec.origin, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=spec.origin)
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            continue
        for deco in node.decorator_list:
            if not isinstance(deco, ast.Call):
                continue
            func = deco.func
            if not (
                (isinstance(func, ast.Name) and func.id == f"register_{kind}")
                or (isinstance(func, ast.Attribute) and func.attr == "register")
            ):
                continue
            nodes = list(deco.args) + [k.value for k in deco.keywords if k.arg in ("name", "description")]
            args = [a.value for a in nodes if isinstance(a, ast.Constant) and isinstance(a.value, (str, type(None)))]
            if not nodes or len(args) != len(nodes):
                return None
            name, desc = args[0], (args[1] if len(args) > 1 else None)
            if not isinstance(name, str):
                return None
            out[name] = desc or _first_line(ast.get_docstring(node))
    return out


ROUTERS = Registry("router", "moebench.routers", "moebench.routers", base="moebench.core.routing:Router")
TASKS = Registry("task", "moebench.tasks", "moebench.tasks", base="moebench.core.task:Task")

register_router = ROUTERS.register
register_task = TASKS.register
