"""The base of every error caused by the user's input (a file, a field, a value).

The CLI prints these as one readable message and exits with status 2; anything else is a bug and
keeps its traceback.
"""


class UserError(ValueError):
    """Bad input; the message names the file or field, the value, and what to do."""
