"""Errors a user can cause. The CLI turns them into one line on stderr and exit code 2."""


class UserError(Exception):
    """A problem with the user's input or environment, worded as a sentence that says what to do."""

    exit_code = 2
