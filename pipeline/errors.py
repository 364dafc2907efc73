"""The one base of every pathdistill error."""


class PathdistillError(Exception):
    """A failure the user can fix: the message names the input (file, store, key, flag, teacher) and
    says what to do. The CLI prints it as one line, ``error: MESSAGE``, and exits with code 2; any
    other exception is a bug and keeps its traceback.

    A subclass also derives from the built-in it used to be (ValueError for a bad input, RuntimeError
    for an operation that failed), so code that catches those keeps working.
    """
