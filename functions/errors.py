"""User-facing errors: one clear line and exit code 2, never a traceback."""
from __future__ import annotations

import sys
from typing import Callable, NoReturn

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """An error the user can fix (bad option, missing data); its message is one line that says what to do."""


def exit_with_error(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(USER_ERROR_EXIT_CODE)


def run_cli(main: Callable[[], object]) -> None:
    """Run an entry point; a UserError becomes one line on stderr and exit code 2."""
    try:
        main()
    except UserError as error:
        exit_with_error(str(error))
