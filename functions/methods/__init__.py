"""Server methods: the contract every method follows (base), the registry, heads, schedules, MoCo and SwAV.

Importing the package registers the built-in methods; a new method is a module of its own that registers itself
(see ServerMethod's docstring) and is imported here, or by whoever uses it (a test, a notebook)."""
from functions.methods import moco, swav  # noqa: F401  (registers them)
