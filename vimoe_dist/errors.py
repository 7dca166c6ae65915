"""The one exception type for a user's mistake: the CLI prints its message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input from the user (config, command line, files); the message names the key or file."""
