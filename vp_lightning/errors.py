"""Errors a user can cause; the CLI prints them as one line instead of a traceback."""


class UserError(Exception):
    """Base class of mistakes the user can fix (bad config values, missing data, missing weights)."""
