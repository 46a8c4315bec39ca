"""llmkit's own error types: every problem a user can cause is one of these, with a message that names the fix.

The CLI turns them into one line on stderr and an exit status (2 for usage errors, 1 for runtime errors);
the Python API lets them propagate so that callers can catch them.
"""


class LlmkitError(Exception):
    """A runtime problem the user can fix (bad data, a broken model directory, no disk space)."""

    exit_code = 1


class UsageError(LlmkitError):
    """A problem with how llmkit was called: a flag, a recipe key, a value out of range."""

    exit_code = 2
