"""User errors: bad input that the CLI reports as one line and a non-zero exit, never a traceback."""


class MtcoreError(Exception):
    """An error in what the user gave us (a path, a file, a config), with what to do about it."""
