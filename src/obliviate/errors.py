"""The error users see.

An ``ObliviateError`` is a problem with the user's input or environment: the CLI prints
its message (one paragraph: what is wrong, what to do) and exits with code 2, no
traceback. Anything else is a bug and keeps its traceback.
"""


class ObliviateError(Exception):
    """A user-facing error: bad input, missing file, impossible setting."""
