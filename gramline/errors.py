"""Bad-input errors and the exit-code contract shared by every stage (DESIGN.md §3).

Exit 0: done. Exit 2: bad input or config, with one paragraph naming the field or file and
what was expected. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn

BAD_INPUT_EXIT_CODE = 2


class InputError(Exception):
    """A user-facing problem with an input, a config value or a file.

    `where` names the field, file or source; `expected` says what would have been accepted.
    """

    def __init__(self, where: str, problem: str, expected: str | None = None) -> None:
        self.where = where
        self.problem = problem
        self.expected = expected
        message = f"{where}: {problem}"
        if expected:
            message += f" (expected {expected})"
        super().__init__(message)


def fail(where: str, problem: str, expected: str | None = None) -> NoReturn:
    raise InputError(where, problem, expected)


def exit_on_input_error(main: Callable[[], int | None], program: str) -> Callable[[], NoReturn]:
    """Wrap a CLI entry point so an InputError prints one clear line and exits 2."""

    def wrapped() -> NoReturn:
        try:
            code = main()
        except InputError as err:
            print(f"{program}: error: {err}", file=sys.stderr)
            sys.exit(BAD_INPUT_EXIT_CODE)
        sys.exit(code or 0)

    return wrapped
