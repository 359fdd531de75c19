"""The error types and the exit-code contract shared by every stage.

Exit 0: done. Exit 2: bad input or config, with one paragraph naming the field or file and what
was expected; running the stage again cannot help. Exit 75 (EX_TEMPFAIL in sysexits.h): an outside
service (S3) stayed unavailable after the retry budget; the message names the operation and the
object, and running the stage again continues from where it stopped. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

BAD_INPUT_EXIT_CODE = 2
TRANSIENT_EXIT_CODE = 75


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


class TransientError(Exception):
    """A service failure that outlasted the retries (S3 throttling, 5xx, resets, timeouts).

    One message argument only, so that it survives being re-raised from a DataLoader worker.
    """
