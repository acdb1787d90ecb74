"""A registry of parser classes by name, for the packages whose parsers are one file each
(tool_parsers/, reasoning/): each module decorates its class with the registry's `register`, and the
package's modules are imported on the first lookup, so adding a parser is adding one file."""
from __future__ import annotations

import importlib
import pkgutil

from kubeinfer.engine.errors import ConfigError


class ParserRegistry:
    def __init__(self, package: str, what: str, flag: str, helper_modules: set[str]):
        self.package, self.what, self.flag = package, what, flag
        self.helper_modules = helper_modules | {"registry"}  # modules that hold no parser
        self._parsers: dict[str, type] = {}
        self._loaded = False

    def register(self, cls: type) -> type:
        taken = self._parsers.get(cls.name)
        if taken is not None and taken is not cls:
            raise ValueError(f"{self.what} name {cls.name!r} is taken by {taken.__name__}")
        self._parsers[cls.name] = cls
        return cls

    def _load_builtin(self) -> None:
        if self._loaded:
            return
        package = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(package.__path__):
            if info.name not in self.helper_modules:
                importlib.import_module(f"{self.package}.{info.name}")
        self._loaded = True

    def names(self) -> list[str]:
        self._load_builtin()
        return sorted(self._parsers)

    def get(self, name: str) -> type:
        """The class registered as `name`; ConfigError listing the names otherwise."""
        self._load_builtin()
        if name not in self._parsers:
            raise ConfigError(f"unknown {self.what} {name!r}; choose one of "
                              f"{', '.join(sorted(self._parsers))} ({self.flag})")
        return self._parsers[name]
