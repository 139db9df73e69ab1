"""The one exception type for bad user input; CLIs print it as a one-line `error: ...` and exit 2."""

from __future__ import annotations

import functools
import signal
import sys


class UserError(ValueError):
    """Bad input: the message names the problem and the fix, on one line."""


def cli_main(fn):
    """Wrap a CLI entry point: one line on stderr, never a traceback, for what a user can fix.

    * UserError -> `error: message`, exit 2;
    * an OSError a user can fix (disk full, read-only filesystem, permission, a file where a folder should be)
      -> `error: PATH: reason (fix)`, exit 1;
    * SIGTERM/SIGHUP (see fsutil.handle_signals) or SIGINT -> the temporaries of unfinished outputs are removed,
      `error: interrupted by SIGTERM ...`, exit 128 + the signal's number.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from m11b_jax import fsutil

        removed_before = fsutil.removed_count
        try:
            with fsutil.handle_signals():
                return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except (fsutil.Interrupted, KeyboardInterrupt) as e:
            signum = getattr(e, "signum", signal.SIGINT)
            fsutil.remove_registered()
            removed = fsutil.removed_count - removed_before
            note = f"; removed {removed} unfinished output(s)" if removed else ""
            print(f"error: interrupted by {signal.Signals(signum).name}{note}", file=sys.stderr)
            sys.exit(128 + int(signum))
        except OSError as e:
            if e.errno not in fsutil.USER_ERRNOS:
                raise
            fsutil.remove_registered()
            print(f"error: {fsutil.os_error_message(e)}", file=sys.stderr)
            sys.exit(1)

    return wrapper
