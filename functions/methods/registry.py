"""The registry of server methods by name: the loop, the options, the models and the benchmark only ever ask it,
never a method's name. The built-in methods register when `functions.methods` is imported; a method defined
elsewhere (a test, a notebook) is known once its module has been imported."""
from __future__ import annotations

from typing import Callable, TypeVar

from functions.core.errors import UserError
from functions.methods.base import ServerMethod

METHODS: dict[str, type[ServerMethod]] = {}


Method = TypeVar("Method", bound=ServerMethod)




def register_method(name: str, *, entry_script: str = "",
                    description: str = "") -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a ServerMethod known as `name`, run by `entry_script`, described in --help by
    `description` (a later registration of the name replaces the earlier one)."""
    def register(method: type[Method]) -> type[Method]:
        if not (isinstance(method, type) and issubclass(method, ServerMethod)):
            raise TypeError("register_method decorates ServerMethod subclasses")
        method.name, method.entry_script, method.description = name, entry_script, description
        METHODS[name] = method
        return method

    return register



def method_names() -> list[str]:
    """Names of every registered method."""
    return sorted(METHODS)


def method_class(name: str) -> type[ServerMethod]:
    """The method registered as `name`; a UserError naming the known ones otherwise."""
    method = METHODS.get(name)
    if method is None:
        raise UserError(f"unknown method {name!r}; the registered methods are {', '.join(sorted(METHODS))}")
    return method
