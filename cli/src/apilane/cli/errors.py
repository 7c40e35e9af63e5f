"""The CLI's own errors: something the user can fix, printed without a traceback."""

from apilane.model.errors import ApilaneError


class CliError(ApilaneError):
    """The message says what is wrong and what to do (exit code 1)."""


class UsageError(CliError):
    """The command line itself is wrong (exit code 2, with the usage)."""
