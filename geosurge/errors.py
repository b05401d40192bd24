"""Errors that the command-line tools report as one clear line (exit code 2), never as a traceback."""


class GeosurgeError(Exception):
    """A user-facing error: bad input file, bad argument, mismatched bundle..."""


class InputFileError(GeosurgeError):
    """A file a user handed us is missing or malformed; the message names the file (and row)."""
