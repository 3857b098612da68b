"""One exception type for bad user input, turned into a one-line message by the CLI."""


class InputError(Exception):
    """Bad input from the user: a file that is missing, unreadable or malformed.

    The message is one sentence that names the file (and row, where there is one) and the
    problem. The CLI prints it without a traceback and exits with code 2.
    """
