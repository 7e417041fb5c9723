"""User-facing errors.

A `DuobenchError` is an error the user can fix (bad input, missing weights, unknown name). The CLI prints
its message as one paragraph and exits non-zero without a traceback; anything else is a bug and keeps its
traceback.
"""


class DuobenchError(Exception):
    """An error whose message names the problem and the fix."""
