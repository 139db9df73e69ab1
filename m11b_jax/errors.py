"""The one exception type for bad user input; CLIs print it as a one-line `error: ...` and exit 2."""

from __future__ import annotations

import functools
import sys


class UserError(ValueError):
    """Bad input: the message names the problem and the fix, on one line."""


def cli_main(fn):
    """Wrap a CLI entry point: a UserError becomes `error: message` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
