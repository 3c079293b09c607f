"""The registry of server methods by name: the loop, the options, the models and the benchmark only ever ask it,
never a method's name. The built-in methods register when `functions.methods` is imported; a method defined
elsewhere (a test, a notebook) is known once its module has been imported."""
from __future__ import annotations

from typing import Callable

from functions.core.registry import Registered, Registry
from functions.methods.base import ServerMethod

METHODS: Registry[type[ServerMethod]] = Registry(ServerMethod, "method", "methods")
method_class = METHODS.lookup


def register_method(name: str, *, entry_script: str = "",
                    description: str = "") -> Callable[[Registered], Registered]:
    """Class decorator: make a ServerMethod known as `name`, run by `entry_script`, described in --help by
    `description` (a later registration of the name replaces the earlier one)."""
    return METHODS.register(name, entry_script=entry_script, description=description)


def method_names() -> list[str]:
    """Names of every registered method."""
    return sorted(METHODS)
