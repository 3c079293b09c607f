"""Classes of one kind by name (server methods, FedAvg rules, privacy defences): a class decorator registers them,
and a lookup of an unknown name is a one-line UserError that lists the known ones."""
from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from functions.core.errors import UserError

Registered = TypeVar("Registered", bound=type)


class Registry(dict, Generic[Registered]):
    """name -> class, for subclasses of `base`; `unknown` names what was asked for in the error ("--defence"),
    `plural` what the registry holds ("defences")."""

    def __init__(self, base: type, unknown: str, plural: str) -> None:
        super().__init__()
        self.base, self.unknown, self.plural = base, unknown, plural

    def register(self, name: str, **attributes: Any) -> Callable[[Registered], Registered]:
        """Class decorator: make a subclass of the base known as `name`, with these class attributes set (a later
        registration of the name replaces the earlier one)."""
        def register(cls: Registered) -> Registered:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"this decorator registers {self.base.__name__} subclasses")
            cls.name = name
            for attribute, value in attributes.items():
                setattr(cls, attribute, value)
            self[name] = cls
            return cls

        return register

    def lookup(self, name: str) -> Registered:
        """The class registered as `name`; a UserError naming the known ones otherwise."""
        cls = self.get(name)
        if cls is None:
            raise UserError(f"unknown {self.unknown} {name!r}; the registered {self.plural} are "
                            f"{', '.join(sorted(self))}")
        return cls
