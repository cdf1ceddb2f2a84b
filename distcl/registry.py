"""One registry type for everything a job names: backbones, heads, methods, alignment terms.

    BACKBONES = Registry("backbone")

    @BACKBONES.register("resnet32")
    def resnet32(in_channels: int, small_input: bool) -> nn.Module: ...

    BACKBONES.get("resnet32")        # the registered object
    BACKBONES.check("nope", "model.backbone")   # ConfigError naming the field and the names

The config validates every name against its registry when a job is loaded, so a misspelt
backbone fails before Ray starts, not inside a Train worker. Pure: no third-party imports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from distcl.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named objects of one kind (``kind`` appears in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if not name or name in self._items:
            raise ValueError(f"{self.kind} name {name!r} is empty or registered twice")
        self._items[name] = item
        return item

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: register under ``name`` (default: the object's ``name`` attribute)."""

        def deco(item: T) -> T:
            return self.add(name or getattr(item, "name", ""), item)

        return deco

    def check(self, name: str, field: str) -> str:
        """``name`` if registered, else a ConfigError naming ``field`` and the known names."""
        if name not in self._items:
            raise ConfigError(f"{field}: unknown {self.kind} {name!r} (known: {self.names()})")
        return name

    def get(self, name: str) -> T:
        return self._items[self.check(name, self.kind)]

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
