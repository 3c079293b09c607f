"""Small typed views of the run options: a part (a FedAvg rule, a privacy defence) receives a dataclass of the
options it reads rather than the whole argparse namespace."""
from __future__ import annotations

import argparse
from dataclasses import fields, is_dataclass
from typing import Any, TypeVar

Options = TypeVar("Options")


def typed_options(options_type: type[Options], args: argparse.Namespace) -> Options:
    """The dataclass `options_type` filled from the run options of the same names."""
    if not is_dataclass(options_type):
        raise TypeError(f"{options_type.__name__} is not a dataclass of run options")
    values: dict[str, Any] = {field.name: getattr(args, field.name) for field in fields(options_type)}
    return options_type(**values)
